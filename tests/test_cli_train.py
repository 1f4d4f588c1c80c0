"""`lorakit train` through the real Typer app: exit codes, stdout JSON, stderr text, mlx-lm YAML configs."""

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Question {i}?", "completion": ["Yes.", "No.", "Maybe later."][i % 3]} for i in range(8)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return path


def test_train_json_then_refuse_then_resume(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--adapter-path", str(out),
            "--iters", "2", "--batch-size", "4", "--steps-per-eval", "2", "--learning-rate", "1e-3"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["adapter_path"] == str(out)
    assert report["best_val_loss"] < report["initial_val_loss"]
    assert "trainable" in result.stderr and "lorakit train" in result.stderr

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "--adapter-path" in refused.stderr and "--resume" in refused.stderr and refused.stdout == ""

    resumed = runner.invoke(app, args[:-6] + ["--iters", "3", "--batch-size", "4", "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "trained 3 steps" in resumed.stdout and f"adapter: {out}" in resumed.stdout


def test_mlx_lm_yaml_config(tiny_model, data, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text(f"""
model: {tiny_model}
data: {data}
adapter_path: {tmp_path / 'ad'}
fine_tune_type: lora
num_layers: 1
batch_size: 4
iters: 2
mask_prompt: true
steps_per_eval: 100
learning_rate: 1.0e-3
lora_parameters:
  keys: [self_attn.q_proj, self_attn.v_proj]
  rank: 4
  scale: 8.0
  dropout: 0.0
""")
    result = runner.invoke(app, ["train", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    params = saved["lora_parameters"]
    assert params["rank"] == 4 and params["scale"] == 8.0
    assert params["keys"] == ["self_attn.q_proj", "self_attn.v_proj"] and saved["num_layers"] == 1
    assert saved["lorakit"]["settings"]["train_on"] == "completions"


def test_bad_input_exits_2(tiny_model, tmp_path):
    result = runner.invoke(app, ["train", "--model", str(tiny_model), "--data", str(tmp_path / "missing"),
                                 "--adapter-path", str(tmp_path / "ad")])
    assert result.exit_code == 2 and "--data" in result.stderr and "lorakit prepare" in result.stderr
    result = runner.invoke(app, ["train", "--model", str(tiny_model), "--data", str(tmp_path),
                                 "--optimizer", "lion"])
    assert result.exit_code == 2 and "--optimizer" in result.stderr
