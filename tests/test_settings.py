import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.errors import UserError
from lorakit.settings import PrepareSettings, TrainSettings, load_settings, save_settings

BASE = {"inputs": ["data.jsonl"], "out": "out"}


def config(tmp_path, data):
    path = tmp_path / "lorakit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults():
    settings, notes = load_settings("prepare", dict(BASE))
    assert isinstance(settings, PrepareSettings) and notes == []
    assert settings.seed == 0 and settings.split == (0.8, 0.1, 0.1) and settings.on_error == "fail"


def test_precedence_cli_over_env_over_yaml_over_defaults(tmp_path, monkeypatch):
    path = config(tmp_path, {"seed": 1, "max_chars": 100, "on_error": "skip", "stratify_by": "label"})
    monkeypatch.setenv("LORAKIT_SEED", "2")
    monkeypatch.setenv("LORAKIT_MAX_CHARS", "200")
    settings, _ = load_settings("prepare", {**BASE, "seed": 3, "max_error_rate": None}, path)
    assert settings.seed == 3  # CLI
    assert settings.max_chars == 200  # env over YAML
    assert settings.on_error == "skip"  # YAML over default
    assert settings.max_error_rate == 0.05  # default (None from the CLI means "not given")


def test_command_section_overrides_top_level(tmp_path):
    path = config(tmp_path, {"seed": 1, "prepare": {"seed": 4}, "train": {"lora_rank": 16}})
    assert load_settings("prepare", dict(BASE), path)[0].seed == 4


def test_env_lists_and_split(monkeypatch):
    monkeypatch.setenv("LORAKIT_FIELD_MAP", "prompt=question, completion=answer")
    monkeypatch.setenv("LORAKIT_SPLIT", "0.7,0.2,0.1")
    settings, _ = load_settings("prepare", dict(BASE))
    assert settings.field_map == ["prompt=question", "completion=answer"]
    assert settings.split == (0.7, 0.2, 0.1)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = config(tmp_path, {"sed": 3, "prepare": {"stratfy_by": "verdict"}, "train": {"lora_rnak": 4}})
    with pytest.raises(UserError) as e:
        load_settings("prepare", dict(BASE), path)
    message = str(e.value)
    assert "unknown key 'sed'; did you mean 'seed'?" in message
    assert "unknown key 'stratfy_by'; did you mean 'stratify_by'?" in message
    assert "unknown key 'train.lora_rnak'; did you mean 'lora_rank'?" in message


def test_all_value_problems_reported_together(monkeypatch):
    monkeypatch.setenv("LORAKIT_MAX_ERROR_RATE", "2")
    with pytest.raises(UserError) as e:
        load_settings("prepare", {"inputs": ["a"], "split": "0.9,0.9,0.1", "on_error": "ignore"})
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid settings:"
    text = str(e.value)
    for flag in ("--out", "--split", "--on-error", "--max-error-rate"):
        assert flag in text
    assert "required; pass --out" in text and "LORAKIT_MAX_ERROR_RATE" in text
    assert len(lines) == 5


def test_missing_positional_named_as_input():
    with pytest.raises(UserError, match="INPUT... .*required"):
        load_settings("prepare", {"out": "x"})


def test_bad_config_files(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_settings("prepare", dict(BASE), tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_settings("prepare", dict(BASE), bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_settings("prepare", dict(BASE), bad)


def test_mlx_lm_config_keys_are_translated(tmp_path):
    path = config(tmp_path, {"model": "m", "data": "d", "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.1},
                             "mask_prompt": True, "lora_layers": 8, "wandb": None})
    settings, notes = load_settings("train", {}, path)
    assert isinstance(settings, TrainSettings)
    assert (settings.lora_rank, settings.lora_alpha, settings.lora_dropout) == (4, 8.0, 0.1)
    assert settings.train_on == "completions" and settings.num_layers == 8
    # what the file leaves out is mlx-lm's default, in one note (tests/test_mlx_lm_config.py has the rest)
    assert notes == [("mlx-lm config: what it leaves out takes mlx-lm's defaults, as mlx_lm.lora would: "
                      "optimizer adam, iters 1000, learning_rate 1e-05, steps_per_eval 200")]
    assert (settings.iters, settings.learning_rate, settings.steps_per_eval) == (1000, 1e-5, 200)


def test_mlx_lm_train_flag_is_not_a_section(tmp_path):
    """mlx-lm's `train: true` is its "do train" flag; a `train:` mapping is lorakit's section."""
    flag = config(tmp_path, {"model": "m", "data": "d", "train": True, "lora_parameters": {"rank": 4, "scale": 2.0}})
    assert load_settings("train", {}, flag)[0].lora_alpha == 8.0
    section = config(tmp_path, {"model": "m", "data": "d", "train": {"lora_rank": 4}})
    assert load_settings("train", {}, section) == (load_settings("train", {"lora_rank": 4, "model": "m",
                                                                           "data": "d"})[0], [])
    bad = config(tmp_path, {"model": "m", "data": "d", "train": 3})
    with pytest.raises(UserError, match="section 'train' must be a mapping"):
        load_settings("train", {}, bad)


def test_resolved_settings_round_trip(tmp_path):
    settings, _ = load_settings("prepare", {**BASE, "seed": 9, "field_map": ["prompt=q"]})
    save_settings(settings, tmp_path / "saved.yaml")
    again, _ = load_settings("prepare", {}, tmp_path / "saved.yaml")
    assert again == settings


def test_cli_reports_config_problems_with_exit_2(tmp_path):
    path = config(tmp_path, {"sed": 1, "max_chars": -5})
    result = CliRunner().invoke(app, ["prepare", "data.jsonl", "--out", "o", "--config", str(path)])
    assert result.exit_code == 2 and "did you mean 'seed'?" in result.stderr
    path = config(tmp_path, {"max_chars": -5, "max_error_rate": 3})
    result = CliRunner().invoke(app, ["prepare", "data.jsonl", "--out", "o", "-c", str(path)])
    assert result.exit_code == 2
    assert "--max-chars" in result.stderr and "--max-error-rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_strings_keep_whitespace_for_generate_and_eval():
    from lorakit.settings import load_settings

    gen, _ = load_settings("generate", {"model": "m", "stop": "\n\n,END"})
    ev, _ = load_settings("eval", {"model": "m", "data": "d", "stop": "\n\n,END", "labels": " A , B"})
    assert gen.stop == ["\n\n", "END"]
    assert ev.stop == ["\n\n", "END"]
    assert ev.labels == ["A", "B"]


def test_mixed_in_fields_read_lorakit_env_only(monkeypatch):
    """Sampling and seed come from mixins; they take LORAKIT_* like every field, never a bare TEMP or SEED."""
    monkeypatch.setenv("TEMP", "/tmp")
    monkeypatch.setenv("SEED", "not a number")
    monkeypatch.setenv("LORAKIT_TOP_K", "7")
    gen, _ = load_settings("generate", {"model": "m", "prompt": "x"})
    ev, _ = load_settings("eval", {"model": "m", "data": "d"})
    assert (gen.temp, gen.top_k, gen.seed) == (0.0, 7, 0)
    assert (ev.temp, ev.top_k, ev.seed) == (0.0, 7, 0)


def test_seed_only_where_random_numbers_are_drawn():
    from lorakit.settings import SETTINGS

    assert {name for name, cls in SETTINGS.items() if "seed" in cls.model_fields} == {
        "prepare", "train", "eval", "generate"}


def test_template_names_are_the_builtin_templates():
    from lorakit.builtin_templates import BUILTIN_TEMPLATES
    from lorakit.settings import TEMPLATES, PrepareSettings

    assert TEMPLATES == tuple(BUILTIN_TEMPLATES)
    assert ", ".join(BUILTIN_TEMPLATES) in PrepareSettings.model_fields["template"].description
