"""End to end on the real SmolLM2-135M-Instruct (GGUF, float32 on CPU): loss + judge metrics."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.engine import eval as ev
from lorakit.engine.reporter import Reporter
from lorakit.settings import EvalSettings

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "judge.jsonl"

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def judge_split(tmp_path_factory):
    """Three judge records of the sample set (one of each verdict) as a split, the way prepare writes it."""
    from lorakit.engine.data.formats import convert

    picked: dict[str, list[dict]] = {"A": [], "B": [], "tie": []}
    for line in SAMPLE.read_text().splitlines():
        record = json.loads(line)
        if not picked[record["verdict"]]:
            picked[record["verdict"]].append(record)
    d = tmp_path_factory.mktemp("real_judge")
    with open(d / "test.jsonl", "w") as f:
        for record in [r for rs in picked.values() for r in rs]:
            example = convert(record, "judge")
            f.write(json.dumps({"messages": example.messages, **example.extra}) + "\n")
    return d


def test_loss_and_judge_on_the_real_model(real_model_gguf, judge_split, tmp_path):
    settings = EvalSettings(model=str(real_model_gguf), dtype="float32", data=judge_split, judge=True,
                            max_tokens=24, out=tmp_path / "out")
    result = ev.run(settings, Reporter())
    loss = result.results["base"]["loss"]
    # an instruct model on well-formed English reasoning: far below a uniform guess (ln 49152 = 10.8)
    assert math.isfinite(loss["loss"]) and 0.3 < loss["loss"] < 5.0
    assert loss["perplexity"] == pytest.approx(math.exp(loss["loss"]))
    assert loss["examples"] == 3 and loss["tokens"] > 3 * 10
    judge = result.results["base"]["judge"]
    assert judge["examples"] == 3
    assert 0.0 <= judge["accuracy"] <= 1.0 and 0.0 <= judge["consistency"] <= 1.0
    shares = sum(v["predicted"] for v in judge["bias"].values())
    assert shares == pytest.approx(1.0)
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(r["judge_output"].strip() for r in rows)  # the model answered every prompt
    assert all(r["loss"] is not None and r["loss_tokens"] > 0 for r in rows)


# ---- no third-party noise on stderr (issue 23) ----------------------------------------------------------------

# `lorakit ARGS...` as a user without PyTorch runs it (the README's install has none): transformers then says
# "PyTorch was not found..." when first imported, unless lorakit keeps its advice off stderr.
_WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.argv = ['lorakit', *sys.argv[1:]]; "
                  "from lorakit.cli.app import main; main()")
_NOISE = re.compile(r"PyTorch was not found|\[transformers\]|\w+Warning:|deprecated", re.IGNORECASE)


def _lorakit(*args: str) -> subprocess.CompletedProcess:
    # the variable lorakit sets in this test process must not hide a subprocess that would not set it
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *map(str, args)], check=False, capture_output=True,
                          text=True, env=env, timeout=600)


def test_no_third_party_noise_on_stderr(real_model_gguf, tmp_path):
    raw = tmp_path / "sql.jsonl"
    raw.write_text("".join(json.dumps({"text": f"table: t{i}\ncolumns: Name, Value\nQ: value of item {i}?\n"
                                               f"A: SELECT Value FROM t{i} WHERE Name = 'item {i}'"}) + "\n"
                           for i in range(8)))
    data, run = tmp_path / "data", tmp_path / "run"
    model = ["--model", real_model_gguf, "--dtype", "float32"]
    commands = {
        "prepare": ["prepare", raw, "--out", data, "--tokenizer", real_model_gguf, "--split", "0.5,0.25,0.25"],
        "train": ["train", *model, "--data", data, "--adapter-path", run, "--iters", "2", "--batch-size", "1",
                  "--val-batches", "1", "--max-seq-length", "128"],
        "eval": ["eval", *model, "--data", data, "--adapter-path", run, "--generate", "--max-tokens", "4",
                 "--prompt-delimiter", "\\nA:"],
        "generate": ["generate", *model, "--adapter-path", run, "--prompt", "table: t\nQ: value?\nA:",
                     "--max-tokens", "4"],
    }
    for name, args in commands.items():
        result = _lorakit(*args)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        noise = [line for line in result.stderr.splitlines() if _NOISE.search(line)]
        assert noise == [], f"{name} printed third-party noise on stderr: {noise}"
