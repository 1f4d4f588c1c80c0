"""Issue 19 (inputs and outputs): through the real CLI, every bad input exits 2 with a message naming the
flag, file or line, never a traceback; `--overwrite` never replaces an input; every output dir is locked; the
inputs are byte-identical afterwards."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.errors import UserError
from lorakit.io import output_lock
from lorakit.settings import SETTINGS, flag, load_settings
from lorakit.testing import random_adapter_dir, tiny_model_dir

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
runner = CliRunner()

# the fields each command needs before its other settings are checked
REQUIRED = {"prepare": {"inputs": ["a.jsonl"], "out": "o"}, "train": {"model": "m", "data": "d"},
            "eval": {"model": "m", "data": "d"}, "generate": {"model": "m"}, "fuse": {"model": "m"}}


def invoke(*args, env=None):
    return runner.invoke(app, [*map(str, args)], env=env)


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (a file or a directory)."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*")))
             if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(result, *texts):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    for text in texts:
        assert text in result.stderr, (text, result.stderr)


def raw_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SAMPLE / "text.jsonl", directory / "raw.jsonl"))


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return random_adapter_dir(tiny_model, tmp_path_factory.mktemp("reliability") / "adapter")


# ------------------------------------------------------------ prepare: --out vs its inputs


def test_prepare_overwrite_never_replaces_its_input(tmp_path):
    raw = raw_data(tmp_path / "x")
    before = digest(tmp_path)
    refused(invoke("prepare", raw, "--out", tmp_path / "x", "--overwrite"), "--out",
            "contains an input (INPUT", str(raw))
    refused(invoke("prepare", raw, "--out", raw, "--overwrite"), "--out", "is an input (INPUT")
    assert digest(tmp_path) == before


def test_prepare_out_next_to_or_inside_model_tokenizer_template(tmp_path, tiny_model):
    raw = raw_data(tmp_path / "raw")
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    template = tmp_path / "tpl" / "chat.jinja"
    template.parent.mkdir()
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    before = digest(tmp_path)
    refused(invoke("prepare", raw, "--out", model / "data", "--model", model), "--out",
            "inside an input (--model")
    refused(invoke("prepare", raw, "--out", model, "--tokenizer", model, "--overwrite"), "is an input (--tokenizer")
    refused(invoke("prepare", raw, "--out", template.parent, "--template", template, "--overwrite"),
            "contains an input (--template")
    assert digest(tmp_path) == before


def test_prepare_out_holding_the_config_is_refused(tmp_path):
    raw = raw_data(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    config = out / "lorakit.yaml"
    config.write_text("seed: 3\n")
    before = digest(tmp_path)
    refused(invoke("prepare", raw, "--out", out, "--overwrite", "--config", config), "--out", "--config",
            str(config))
    assert digest(tmp_path) == before


def test_prepare_out_is_locked(tmp_path):
    raw = raw_data(tmp_path / "raw")
    out = tmp_path / "out"
    with output_lock(out, "--out"):  # another run (this live process) holds it
        refused(invoke("prepare", raw, "--out", out), "--out", "in use by another lorakit run",
                f"pid {os.getpid()}", socket.gethostname())
    assert not out.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "x"}))
    result = invoke("prepare", raw, "--out", out)  # a stale lock is taken over
    assert result.exit_code == 0, result.stderr
    assert (out / "train.jsonl").exists() and not lock.exists()


# ------------------------------------------------------------ prepare: empty inputs, --split


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"),
                                        ("empty.json", "[]")])
def test_prepare_empty_input_names_the_file(tmp_path, name, text):
    empty = tmp_path / name
    empty.write_text(text)
    refused(invoke("prepare", empty, "--out", tmp_path / "out"), f"{empty}: no records")
    good = raw_data(tmp_path / "raw")  # an empty file among good ones is named too
    refused(invoke("prepare", good, empty, "--out", tmp_path / "out"), f"{empty}: no records")
    assert not (tmp_path / "out").exists()


def test_prepare_with_nothing_left_is_an_error(tmp_path):
    data = tmp_path / "blank.jsonl"
    data.write_text('{"text": " "}\n{"text": ""}\n')
    refused(invoke("prepare", data, "--out", tmp_path / "out", "--on-error", "skip", "--max-error-rate", "1"),
            "none of the 2 records is usable")


@pytest.mark.parametrize("split", ["0.5,0.5", "0.5,0.3,0.1,0.1", "0.9"])
def test_split_needs_three_numbers(tmp_path, split):
    raw = raw_data(tmp_path / "raw")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--split", split), "--split",
            "expected three numbers like 0.8,0.1,0.1 (train,valid,test)")
    assert "required" not in invoke("prepare", raw, "--out", tmp_path / "o", "--split", split).stderr


def test_split_of_three_from_a_config_list(tmp_path):
    raw = raw_data(tmp_path / "raw")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"split": [0.5, 0.5]}))
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--config", config), "--split",
            "expected three numbers")


# ------------------------------------------------------------ settings: config file, seed, inf/nan


def test_binary_config_names_the_file(tmp_path):
    raw = raw_data(tmp_path / "raw")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--config", binary),
            f"--config {binary}: not a text YAML file")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"seed: 1\x00\x01\n")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--config", nul),
            f"--config {nul}: not a text YAML file")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--config", tmp_path), "is a directory")


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_seed_out_of_range(tmp_path, seed):
    raw = raw_data(tmp_path / "raw")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", "--seed", seed), "--seed")
    refused(invoke("prepare", raw, "--out", tmp_path / "out", env={"LORAKIT_SEED": seed}), "--seed",
            "LORAKIT_SEED")
    refused(invoke("train", "--model", "m", "--data", tmp_path, "--seed", seed), "--seed")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("command, flags", [
    ("prepare", ["a.jsonl", "--out", "o", "--max-error-rate"]),
    ("train", ["--model", "m", "--data", "d", "--learning-rate"]),
    ("train", ["--model", "m", "--data", "d", "--lora-alpha"]),
    ("train", ["--model", "m", "--data", "d", "--epochs"]),
    ("fuse", ["--model", "m", "--verify-tolerance"]),
    ("generate", ["--model", "m", "--prompt", "x", "--temp"]),
])
def test_inf_and_nan_flags_are_refused(tmp_path, monkeypatch, command, flags, value):
    monkeypatch.chdir(tmp_path)
    refused(invoke(command, *flags, value), flags[-1], "finite number")


def test_inf_and_nan_from_env_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(invoke("train", "--model", "m", "--data", "d", env={"LORAKIT_LEARNING_RATE": "nan"}),
            "--learning-rate", "LORAKIT_LEARNING_RATE", "finite number")
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: .inf\nwarmup: .nan\n")
    refused(invoke("train", "--model", "m", "--data", "d", "--config", config), "--learning-rate", "--warmup")
    refused(invoke("prepare", "a.jsonl", "--out", "o", "--split", "nan,0,0"), "--split", "finite number")


def holds_float(annotation) -> bool:
    return annotation is float or any(holds_float(arg) for arg in typing.get_args(annotation))


def float_fields():
    for command, cls in SETTINGS.items():
        for name, field in cls.model_fields.items():
            if holds_float(field.annotation):
                yield command, name


@pytest.mark.parametrize("command, name", list(float_fields()))
def test_every_float_setting_refuses_inf(command, name):
    value = "inf,0,0" if name == "split" else "inf"
    with pytest.raises(UserError, match=f"{flag(name)} .*finite number"):
        load_settings(command, {**REQUIRED[command], name: value})


# ------------------------------------------------------------ fuse: --out and --export-gguf vs its inputs


def test_fuse_overwrite_never_replaces_the_model(tmp_path, tiny_model, adapter):
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    before = digest(model, adapter)
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", model, "--overwrite"),
            "--out", "is an input (--model")
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", model / "fused"),
            "inside an input (--model")
    assert digest(model, adapter) == before and not (model / "fused").exists()


def test_fuse_out_and_adapter(tmp_path, tiny_model, adapter):
    runs = tmp_path / "runs"
    mine = Path(shutil.copytree(adapter, runs / "adapter"))
    before = digest(tmp_path)
    refused(invoke("fuse", "--model", tiny_model, "--adapter-path", mine, "--out", runs, "--overwrite"),
            "--out", "contains an input (--adapter-path")
    refused(invoke("fuse", "--model", tiny_model, "--adapter-path", mine, "--out", mine / "fused"),
            "inside an input (--adapter-path")
    assert digest(tmp_path) == before


def test_fuse_gguf_inside_an_input_is_refused(tmp_path, tiny_model, adapter):
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    before = digest(model, adapter)
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", tmp_path / "f",
                   "--export-gguf", model / "model.gguf"), "--export-gguf", "inside an input (--model")
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", tmp_path / "f",
                   "--export-gguf", adapter / "model.gguf"), "--export-gguf",
            "inside an input (--adapter-path")
    assert digest(model, adapter) == before and not (tmp_path / "f").exists()


def test_fuse_out_holding_the_config_is_refused(tmp_path, tiny_model, adapter):
    out = tmp_path / "fused"
    out.mkdir()
    config = out / "fuse.yaml"
    config.write_text(f"model: {tiny_model}\n")
    before = digest(tmp_path)
    refused(invoke("fuse", "--adapter-path", adapter, "--out", out, "--overwrite", "--config", config),
            "--out", "--config")
    refused(invoke("fuse", "--adapter-path", adapter, "--out", tmp_path / "o", "--export-gguf", config,
                   "--overwrite", "--config", config), "--export-gguf", "is an input (--config")
    assert digest(tmp_path) == before


def test_fuse_out_is_locked(tmp_path, tiny_model, adapter):
    out = tmp_path / "fused"
    with output_lock(out, "--out"):
        refused(invoke("fuse", "--model", tiny_model, "--adapter-path", adapter, "--out", out),
                "--out", "in use by another lorakit run")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ fuse: chat template, group sizes


def test_fuse_sandbox_violating_chat_template_names_it(tmp_path, tiny_model, adapter):
    model = Path(shutil.copytree(tiny_model, tmp_path / "m"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}\n{{ messages.append(m) }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    before = digest(model, adapter)
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", tmp_path / "f"),
            f"--model {model}", str(model / "tokenizer_config.json"), "line 2", "SecurityError",
            "--no-verify")
    assert not (tmp_path / "f").exists()
    result = invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", tmp_path / "f",
                    "--no-verify")
    assert result.exit_code == 0, result.stderr
    result = invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", tmp_path / "q",
                    "--no-verify", "--requantize", "8")  # the error is still measured, on the plain texts
    assert result.exit_code == 0, result.stderr
    assert "measured on plain text only" in " ".join(result.stderr.split())
    assert digest(model, adapter) == before


@pytest.mark.parametrize("group", ["7", "16", "0", "256"])
def test_q_group_size_must_be_one_mlx_supports(tmp_path, tiny_model, adapter, group):
    refused(invoke("fuse", "--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "f",
                   "--requantize", "4", "--q-group-size", group), "--q-group-size", "32, 64 or 128")
    refused(invoke("fuse", "--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "f",
                   "--quantize", "4", "--q-group-size", group), "--q-group-size")
    refused(invoke("train", "--model", tiny_model, "--data", tmp_path, "--quantize", "4",
                   "--q-group-size", group), "--q-group-size")
    assert not (tmp_path / "f").exists()


def test_requantize_that_quantizes_nothing_is_an_error(tmp_path):
    model = tiny_model_dir(tmp_path / "inputs" / "model", hidden_size=32)  # no layer's input reaches 128
    adapter = random_adapter_dir(model, tmp_path / "inputs" / "adapter")
    before = digest(tmp_path)
    out = tmp_path / "f"
    refused(invoke("fuse", "--model", model, "--adapter-path", adapter, "--out", out, "--requantize", "4",
                   "--q-group-size", "128"), "--requantize 4", "divides by 128", "nothing would be quantized")
    assert digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_requantize_that_leaves_layers_float_says_so(tmp_path, tiny_model, adapter):
    result = invoke("fuse", "--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "f",
                    "--requantize", "4", "--q-group-size", "128", "--json")
    assert result.exit_code == 0, result.stderr
    assert "layers stay float (their input size does not divide by 128" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["quantization"] == {"group_size": 128, "bits": 4}


# ------------------------------------------------------------ generate and eval


def test_generate_input_or_output_that_is_a_directory(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    refused(invoke("generate", "--model", tiny_model, "--input", tmp_path), f"--input {tmp_path}: is a directory")
    refused(invoke("generate", "--model", tiny_model, "--input", prompts, "--output", tmp_path),
            f"--output {tmp_path}: is a directory")
    refused(invoke("generate", "--model", tiny_model, "--input", prompts, "--output", prompts, "--overwrite"),
            "--output", "is an input (--input")
    assert prompts.read_text() == '{"prompt": "hi"}\n'


def test_generate_refuses_a_prompt_longer_than_the_context(tmp_path, tiny_model):
    long = " ".join(["hello world"] * 3000)  # the tiny model's context is 2048 tokens
    refused(invoke("generate", "--model", tiny_model, "--prompt", long, "--no-chat-template"),
            "--prompt: the prompt is", "the model's context is 2,048")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    refused(invoke("generate", "--model", tiny_model, "--input", prompts, "--no-chat-template"),
            f"{prompts}:2: the prompt is")


def test_generate_output_is_locked(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "answers.jsonl"
    with output_lock(out, "--output"):
        refused(invoke("generate", "--model", tiny_model, "--input", prompts, "--output", out),
                "--output", "in use by another lorakit run")
    assert not out.exists()


def test_eval_out_is_locked_and_never_an_input(tmp_path, tiny_model, adapter):
    data = tmp_path / "data"
    assert invoke("prepare", SAMPLE / "chat.jsonl", "--out", data).exit_code == 0
    before = digest(data, adapter)
    with output_lock(tmp_path / "ev", "--out"):
        refused(invoke("eval", "--model", tiny_model, "--data", data, "--out", tmp_path / "ev"),
                "in use by another lorakit run")
    refused(invoke("eval", "--model", tiny_model, "--data", data, "--out", data, "--overwrite"),
            "is an input (--data")
    refused(invoke("eval", "--model", tiny_model, "--data", data, "--out", tmp_path, "--overwrite"),
            "contains an input (--data")
    assert digest(data, adapter) == before


def test_eval_labels_with_no_label_is_refused(tmp_path, tiny_model):
    refused(invoke("eval", "--model", tiny_model, "--data", tmp_path, "--labels", ","), "--labels",
            "no label in ','")


@pytest.mark.parametrize("flags", [["--val-batches", "0"], ["--val-batches", "-2"],
                                   ["--lora-rank", str(2**62)], ["--iters", str(2**63)]])
def test_train_numbers_out_of_range_name_the_flag(tmp_path, flags):
    refused(invoke("train", "--model", "m", "--data", tmp_path, *flags), flags[0])


def test_eval_unknown_split_names_the_flag(tmp_path):
    (tmp_path / "d").mkdir()
    refused(invoke("eval", "--model", "m", "--data", tmp_path / "d", "--split", "bogus"), "--split",
            "no bogus.jsonl")


def test_checkpoint_file_that_is_not_safetensors_is_a_user_error(tmp_path):
    import pickle

    from lorakit.engine.model.checkpoint import _load_tensors

    bad = tmp_path / "optimizer.safetensors"
    bad.write_bytes(pickle.dumps({"payload": "x"}))
    with pytest.raises(UserError, match=f"{bad}: not a readable safetensors file"):
        _load_tensors(bad)


def test_interrupt_while_the_cli_imports_exits_130_without_traceback(monkeypatch, capsys):
    import builtins

    from lorakit.cli import entry

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):  # Ctrl-C lands while the commands are being imported
        if name == "lorakit.cli.app":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_messages_with_brackets_are_printed_as_written(tmp_path):
    (tmp_path / "odd[").mkdir()
    bad = tmp_path / "odd[" / "]data[bold]x.jsonl"  # with the directory: '[/]data[bold]' in the path
    bad.write_text('{"prompt": "a", "completion": " "}\n')
    refused(invoke("prepare", bad, "--out", tmp_path / "out"), f"{bad}:1")


def test_json_nested_too_deeply_names_file_and_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "ok"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    refused(invoke("prepare", deep, "--out", tmp_path / "out"), f"{deep}:2", "nested too deeply")
