"""End to end on the real SmolLM2-135M-Instruct (GGUF, float32 on CPU): loss + judge metrics."""

import json
import math
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
