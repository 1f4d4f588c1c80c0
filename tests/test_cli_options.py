"""The CLI's options are the settings: every command's flags are exactly its settings fields, each field is
spelled one way in every command, and its help is the field's description. The engine stays CLI-free."""

import ast
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.settings import COMMANDS, SETTINGS

ROOT = typer.main.get_command(app)
ENGINE = Path(__file__).resolve().parent.parent / "lorakit" / "engine"


def params(command: str) -> list:
    return [p for p in ROOT.commands[command].params if p.name != "help"]


def test_the_app_offers_every_command():
    assert list(ROOT.commands) == list(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_are_exactly_the_settings_fields(command):
    flags = {p.name for p in params(command)} - {"config"}
    assert flags == set(SETTINGS[command].model_fields)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_the_field_description(command):
    fields = SETTINGS[command].model_fields
    for p in params(command):
        if p.param_type_name == "option" and p.name in fields:  # typer may vendor click: no isinstance
            assert p.help == fields[p.name].description, f"{command} {p.opts}"


def test_one_spelling_per_field_across_commands():
    spellings: dict[str, dict[tuple, list[str]]] = {}
    for command in COMMANDS:
        for p in params(command):
            spelling = (*p.opts, *(f"/{o}" for o in p.secondary_opts))
            spellings.setdefault(p.name, {}).setdefault(spelling, []).append(command)
    assert {name: s for name, s in spellings.items() if len(s) > 1} == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_true_default_can_be_turned_off(command):
    """`--x/--no-x` where the default is on; a False-default flag is plain or `--x/--no-x` the same everywhere
    (test_one_spelling_per_field_across_commands)."""
    for name, field in SETTINGS[command].model_fields.items():
        if field.annotation is bool and field.default is True:
            option = next(p for p in params(command) if p.name == name)
            assert option.secondary_opts == ["--no-" + name.replace("_", "-")], f"{command} --{name}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_80_columns(command):
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_the_engine_never_imports_the_cli():
    for path in sorted(ENGINE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("typer", "click", "rich"), f"{path}: imports {module}"
                assert not module.startswith("lorakit.cli"), f"{path}: imports {module}"


def help_text(command: str) -> str:
    """A command's --help at 80 columns, its whitespace normalised (notes wrap across lines)."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


@pytest.mark.parametrize("command, text", [
    ("train", ("--optimizer <str> Optimizer. [env: LORAKIT_OPTIMIZER] [default: adamw] "
               "[possible values: adam, adamw, sgd, adafactor]")),
    ("train", "[possible values: constant, cosine, linear]"),
    ("prepare", "[possible values: messages, text]"),
    ("fuse", "[possible values: f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1]"),
    ("fuse", "[possible values: bfloat16, float16, float32]"),
    ("train", ("-m, --model <str> Hugging Face repo id, local model directory, or .gguf file. "
               "[env: LORAKIT_MODEL] [required]")),
    ("train", ("--pack / --no-pack Pack several examples per row (no cross-example attention). "
               "[env: LORAKIT_PACK] [default: --no-pack]")),
    ("prepare", "INPUT Raw JSONL / JSON files to read. [env: LORAKIT_INPUTS] [required]"),
])
def test_help_shows_choices_env_defaults_and_required(command, text):
    assert text in help_text(command)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_like_uv(command):
    """Every field's env variable, no type placeholder on a flag, no '(required)' default, and an example."""
    text = help_text(command)
    for name in SETTINGS[command].model_fields:
        assert f"[env: LORAKIT_{name.upper()}]" in text, name
    assert "<bool>" not in text and "(required)" not in text and "[default: none]" not in text
    example = text.split("Example: ", 1)[1]
    assert example.startswith(f"lorakit {command} ")
