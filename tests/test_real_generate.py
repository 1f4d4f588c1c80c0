"""`lorakit generate` end to end on the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app

pytestmark = pytest.mark.real_model
QUESTION = "What is the capital of France?"


def test_greedy_answer_is_coherent_and_batching_agrees(real_model_gguf, tmp_path):
    runner = CliRunner()
    args = ["generate", "--model", str(real_model_gguf), "--dtype", "float32", "--max-tokens", "24"]
    single = runner.invoke(app, [*args, "--prompt", QUESTION, "--json"])
    assert single.exit_code == 0, single.stderr
    answer = json.loads(single.stdout)
    assert "Paris" in answer["text"]
    assert answer["generation_tps"] > 0 and answer["prompt_tokens"] > 5

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "fr", "prompt": QUESTION}) + "\n"
                       + json.dumps({"id": "de", "prompt": "What is the capital of Germany?"}) + "\n")
    batch = runner.invoke(app, [*args, "--input", str(prompts), "--stop", "Paris"])
    assert batch.exit_code == 0, batch.stderr
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert rows[0]["id"] == "fr" and rows[0]["text"] == answer["text"][:answer["text"].index("Paris")]
    assert rows[0]["finish_reason"] == "stop" and "Berlin" in rows[1]["text"]
