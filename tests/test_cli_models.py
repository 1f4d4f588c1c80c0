"""`lorakit models` lists the directories converted from .gguf files; an adapter trained on a .gguf records its
converted directory, which mlx-lm loads as it is."""

import json

import mlx.core as mx
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine.export.gguf_export import export_gguf
from lorakit.testing import random_adapter_dir, tiny_model_dir


def test_models_lists_the_converted_gguf_and_the_adapter_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # the session's cache holds other tests' models
    runner = CliRunner()
    empty = runner.invoke(app, ["models", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout)["models"] == []

    model = tiny_model_dir(tmp_path / "model", family="qwen2")
    path = tmp_path / "tiny-qwen2.gguf"
    export_gguf(mx.load(str(model / "model.safetensors")), json.loads((model / "config.json").read_text()), model,
                path, "q8_0", name="tiny")
    adapter = random_adapter_dir(path, tmp_path / "adapter")
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["model"] == str(path)

    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.stderr
    [listed] = json.loads(result.stdout)["models"]
    assert listed["path"] == recorded["lorakit"]["model_dir"]
    assert listed["source_file"] == "tiny-qwen2.gguf" and listed["source_path"] == str(path.resolve())
    assert listed["model_type"] == "qwen2" and listed["quantization"] == {"group_size": 32, "bits": 8}
    assert listed["size_bytes"] > 0

    from mlx_lm.utils import load

    converted, tokenizer = load(listed["path"], adapter_path=str(adapter))  # mlx-lm takes it as it is
    assert converted(mx.array([tokenizer.encode("hello")])).shape[-1] == 384

    text = runner.invoke(app, ["models"]).stdout
    assert f"{listed['path']}\n  from {path.resolve()} (qwen2, 8-bit" in text
