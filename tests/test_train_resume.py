"""Exact resume, interruption, checkpoint rotation and damaged checkpoints."""

import json

import mlx.core as mx
import pytest

from lorakit.engine import train
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import Interrupted, UserError
from lorakit.settings import TrainSettings

ANSWERS = ["Open Settings, then Reset password.", "The capital of France is Paris.",
           "Your order ships in 3-5 business days.", "Answer A is better. Verdict: A"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(8)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return path


def settings(model, data, out, **kw):
    # dropout makes the run depend on the RNG state; 2 batches per epoch, so 6 steps cross epochs
    # constant LR after warmup, so a 3-step run is a prefix of a 6-step one
    base = {"model": str(model), "data": data, "adapter_path": out, "batch_size": 4, "iters": 6,
            "learning_rate": 1e-3, "lora_dropout": 0.1, "steps_per_report": 1, "steps_per_eval": 3,
            "save_every": 1, "keep_last": 2, "warmup": 2, "quiet": True}
    return TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """An uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("ref") / "ad"
    train.run(settings(tiny_model, data, out), RecordingReporter())
    return mx.load(str(out / "adapters.safetensors"))


def assert_bitwise_equal(a, b):
    assert set(a) == set(b)
    for key in a:
        assert mx.array_equal(a[key], b[key]).item(), key


def test_resume_is_bitwise_exact_and_rotates(tiny_model, data, tmp_path, reference):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=3), RecordingReporter())
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000003"]  # keep_last 2
    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, out, resume=True), rec)
    assert result.resumed_from.endswith("step-000003") and result.steps == 6
    assert_bitwise_equal(mx.load(str(out / "adapters.safetensors")), reference)
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "train_loss" in line]
    assert iterations == [1, 2, 3, 4, 5, 6]  # no duplicated lines after resuming
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000005", "step-000006"]


class InterruptAt(RecordingReporter):
    def __init__(self, step):
        super().__init__()
        self.step = step
        self.done = 0

    def advance(self, n=1, **fields):
        self.done += n
        if fields and self.done == self.step:
            raise KeyboardInterrupt


def test_interrupt_saves_and_resume_matches(tiny_model, data, tmp_path, reference):
    out = tmp_path / "ad"
    with pytest.raises(Interrupted) as info:
        train.run(settings(tiny_model, data, out, save_every=100), InterruptAt(4))
    assert info.value.exit_code == 130
    assert f"lorakit train --config {out / 'lorakit.yaml'} --resume" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000004"]
    assert not (out / "adapters.safetensors").exists()
    train.run(settings(tiny_model, data, out, save_every=100, resume=True), RecordingReporter())
    assert_bitwise_equal(mx.load(str(out / "adapters.safetensors")), reference)


def test_damaged_checkpoint_is_skipped(tiny_model, data, tmp_path, reference):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=4), RecordingReporter())
    newest = ckpt.list_checkpoints(out)[-1]
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, out, resume=True), rec)
    assert result.resumed_from.endswith("step-000003")
    assert any("step-000004 is unusable" in m and "checksum" in m for kind, m in rec.events if kind == "warn")
    assert_bitwise_equal(mx.load(str(out / "adapters.safetensors")), reference)


def test_resume_from_and_refusals(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    with pytest.raises(UserError, match="--resume-from .*not a directory"):
        train.run(settings(tiny_model, data, out, resume_from=tmp_path / "nope"), RecordingReporter())
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(UserError, match="no intact checkpoint"):
        train.run(settings(tiny_model, data, out, resume=True), RecordingReporter())
    with pytest.raises(UserError, match="incomplete"):
        train.run(settings(tiny_model, data, tmp_path / "other", resume_from=out / "checkpoints" / "step-000001"),
                  RecordingReporter())
