import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.errors import Interrupted, RunError, UserError

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
runner = CliRunner()


def test_help_is_fast_and_imports_no_mlx():
    code = ("import sys, time; t = time.perf_counter(); from lorakit.cli.app import app; "
            "heavy = [m for m in ('mlx', 'mlx_lm', 'transformers', 'jinja2') if m in sys.modules]; "
            "print(time.perf_counter() - t, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[1].strip() == "[]"
    best = float("inf")
    for _ in range(2):  # the best of two, so a busy machine does not fail it
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True,
                              check=False)
        best = min(best, time.perf_counter() - start)
        assert done.returncode == 0 and "prepare" in done.stdout
    assert best < 2.0, f"lorakit --help took {best:.2f} s"


def test_every_option_has_help_and_a_shown_default():
    root = typer.main.get_command(app)
    assert "prepare" in root.commands
    for name, command in root.commands.items():
        assert command.help, name
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":  # typer may vendor click
                assert param.help, f"{name} {param.opts}: no help"
                assert param.show_default not in (None, False), f"{name} {param.opts}: no shown default"


def test_command_help_shows_defaults():
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0
    for text in ("--split", "0.8,0.1,0.1", "--max-error-rate", "0.05", "--on-error", "fail", "--no-dedupe"):
        assert text in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("lorakit 0.1.0\nmlx ") and "mlx-lm " in result.stdout and "device:" in result.stdout


def test_unknown_flag_is_a_usage_error():
    result = runner.invoke(app, ["prepare", "a.jsonl", "--out", "x", "--sead", "3"])
    assert result.exit_code == 2 and "--sead" in result.stderr


def test_json_is_exactly_one_object_on_stdout(tmp_path):
    result = runner.invoke(app, ["prepare", str(SAMPLE / "text.jsonl"), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1 and isinstance(json.loads(result.stdout), dict)


def _fail_with(monkeypatch, error):
    def run(settings, reporter):
        raise error

    monkeypatch.setattr("lorakit.engine.prepare.run", run)


@pytest.mark.parametrize("error, code, text", [
    (UserError("data.jsonl:3: bad record"), 2, "error: data.jsonl:3: bad record"),
    (RunError("loss is NaN at step 12"), 1, "error: loss is NaN at step 12"),
    (RuntimeError("unexpected"), 1, "RuntimeError: unexpected"),
    (Interrupted("saved step 40"), 130, "interrupted: saved step 40"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_exit_codes(monkeypatch, tmp_path, error, code, text):
    _fail_with(monkeypatch, error)
    result = runner.invoke(app, ["prepare", "a.jsonl", "--out", str(tmp_path / "o")])
    assert result.exit_code == code and text in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unexpected_errors_suggest_debug(monkeypatch, tmp_path):
    _fail_with(monkeypatch, RuntimeError("boom"))
    result = runner.invoke(app, ["prepare", "a.jsonl", "--out", str(tmp_path / "o")])
    assert "rerun with --debug" in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, tmp_path, how):
    _fail_with(monkeypatch, RuntimeError("boom"))
    args = ["prepare", "a.jsonl", "--out", str(tmp_path / "o")]
    if how == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv("LORAKIT_DEBUG", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: boom" in result.stderr


def test_user_error_traceback_only_with_debug(tmp_path):
    args = ["prepare", str(SAMPLE / "broken" / "unknown_role.jsonl"), "--out", str(tmp_path / "o")]
    assert "Traceback" not in runner.invoke(app, args).stderr
    result = runner.invoke(app, [*args, "--debug"])
    assert result.exit_code == 2 and "Traceback" in result.stderr
