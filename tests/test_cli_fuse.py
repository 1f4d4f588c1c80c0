"""`lorakit fuse` through the real Typer app: exit codes, stdout JSON, stderr messages."""

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.testing import random_adapter_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return random_adapter_dir(tiny_model, tmp_path_factory.mktemp("cli_fuse") / "adapter", fine_tune_type="dora")


def fuse(*args):
    return runner.invoke(app, ["fuse", *map(str, args)])


def test_json_result(tiny_model, adapter, tmp_path):
    out, gguf = tmp_path / "fused", tmp_path / "fused.gguf"
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", out, "--export-gguf", gguf,
                  "--gguf-type", "q8_0", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert data["out"] == str(out) and data["dtype"] == "float32" and data["fine_tune_type"] == "dora"
    assert data["check"]["passed"] is True and data["check"]["max_logit_diff"] < 1e-4
    assert data["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert data["size_bytes"] == sum(data["files"].values())
    assert data["gguf"]["path"] == str(gguf) and data["gguf"]["type"] == "q8_0" and gguf.is_file()
    assert "verification: max logit difference" in result.stderr


def test_human_output(tiny_model, adapter, tmp_path):
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "q", "--requantize", "8")
    assert result.exit_code == 0, result.stderr
    assert "fused model:" in result.stdout and "re-quantized to 8 bits" in result.stdout
    assert "re-quantization error: max logit difference" in result.stdout


def test_existing_out_needs_overwrite(tiny_model, adapter, tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", out)
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr and str(out) in result.stderr
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_bad_flags_exit_2(tiny_model, adapter, tmp_path):
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "o", "--requantize", "3")
    assert result.exit_code == 2 and "--requantize" in result.stderr
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", tmp_path / "o", "--gguf-type", "q4_k")
    assert result.exit_code == 2 and "--gguf-type" in result.stderr
    result = fuse("--model", tiny_model, "--adapter-path", tmp_path / "missing", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--adapter-path" in result.stderr
    assert not (tmp_path / "o").exists()


def test_failed_verification_exits_1_and_ships_nothing(tiny_model, adapter, tmp_path):
    out = tmp_path / "fused"
    result = fuse("--model", tiny_model, "--adapter-path", adapter, "--out", out, "--verify-tolerance", "1e-12")
    assert result.exit_code == 1
    assert "verification failed" in result.stderr and "nothing was written" in result.stderr
    assert result.stdout == "" and not out.exists() and list(tmp_path.iterdir()) == []
