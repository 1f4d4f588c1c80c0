"""A damaged .gguf given as --model is a user error naming the file (exit 2), never a crash inside MLX."""

import json
import struct

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine.export.gguf_export import export_gguf
from lorakit.testing import tiny_model_dir


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory.mktemp("m") / "model")
    path = model.parent / "tiny.gguf"
    export_gguf(mx.load(str(model / "model.safetensors")), json.loads((model / "config.json").read_text()), model,
                path, "f16", name="tiny")
    return path


def damaged(good: bytes, kind: str) -> bytes:
    return {
        "garbage": b"this is not a model\n" * 50,
        "empty": b"",
        "header only": good[:8],
        "cut in the metadata": good[:600],
        "cut in the tensors": good[: len(good) - 1000],
        "version 9": good[:4] + struct.pack("<I", 9) + good[8:],
    }[kind]


@pytest.mark.parametrize("kind", ["garbage", "empty", "header only", "cut in the metadata", "cut in the tensors",
                                  "version 9"])
def test_damaged_gguf_exits_2_naming_the_file(kind, good_gguf, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(damaged(good_gguf.read_bytes(), kind))
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "2"])
    assert result.exit_code == 2, (kind, result.output)
    assert f"--model {path}" in " ".join(result.stderr.split()), result.stderr
    assert any(word in result.stderr for word in ("not a GGUF file", "truncated", "version 9")), result.stderr


def test_the_good_file_loads(good_gguf):
    result = CliRunner().invoke(app, ["generate", "--model", str(good_gguf), "--prompt", "hi", "--max-tokens", "2"])
    assert result.exit_code == 0, result.stderr
