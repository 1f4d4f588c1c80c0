"""End to end on the real SmolLM2-135M-Instruct GGUF: prepare, train briefly, fuse, generate from the fused model
(MLX, transformers, and the exported GGUF through lorakit's importer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app

pytestmark = pytest.mark.real_model
QUESTION = "What is the capital of France?"
SAMPLE_CHATS = Path(__file__).resolve().parents[1] / "sample_data" / "chat.jsonl"
runner = CliRunner()


def lorakit(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def answer(model, *extra) -> str:
    result = lorakit("generate", "--model", model, "--dtype", "float32", "--max-tokens", "16", "--prompt", QUESTION,
                     "--json", *extra)
    return json.loads(result.stdout)["text"]


def test_train_fuse_generate(real_model_gguf, tmp_path):
    data, adapter, fused, gguf_file = tmp_path / "data", tmp_path / "adapter", tmp_path / "fused", tmp_path / "f.gguf"
    lorakit("prepare", SAMPLE_CHATS, "--out", data, "--quiet")
    lorakit("train", "--model", real_model_gguf, "--data", data, "--adapter-path", adapter, "--dtype", "float32",
            "--iters", 4, "--batch-size", 2, "--max-seq-length", 256, "--learning-rate", 2e-4, "--steps-per-eval", 4,
            "--val-batches", 1, "--save-every", 4, "--quiet")

    result = json.loads(lorakit("fuse", "--model", real_model_gguf, "--adapter-path", adapter, "--out", fused,
                                "--dtype", "float32", "--export-gguf", gguf_file, "--json").stdout)
    check = result["check"]
    assert check["passed"] and check["top1_agreement"] >= 0.95
    assert check["adapter_effect"] > 0  # training moved the logits
    assert result["qk_rows_restored"] and result["dtype"] == "float32" and result["fused_layers"] == 210
    assert result["gguf"]["tokenizer_pre"] == "smollm" and gguf_file.stat().st_size > 200e6
    gguf_check = result["gguf"]["check"]  # the f16 file read back and run: f16 rounding, measured 0.07, greedy 100%
    assert gguf_check["passed"] and gguf_check["max_logit_diff"] < 0.3 and gguf_check["greedy_agreement"] == 1.0
    assert (tmp_path / "Modelfile").read_text().startswith('FROM ./f.gguf\nTEMPLATE """{{- range .Messages }}')

    fused_answer = answer(fused)
    assert "Paris" in fused_answer
    assert fused_answer == answer(real_model_gguf, "--adapter-path", adapter)  # fused == base + adapter
    assert "Paris" in answer(gguf_file)  # llama.cpp-layout export, read back by lorakit's GGUF import

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(fused), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(fused))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    hf_answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert hf_answer.strip() == fused_answer.strip()
