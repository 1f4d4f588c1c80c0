"""The training engine on the tiny model: outputs, fine-tune kinds, packing, accumulation, best/early stop,
non-finite detection, and mlx-lm loading what we write."""

import json
import sys

import mlx.core as mx
import numpy as np
import pytest

from lorakit.engine import train
from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.data.tokenized import load_split
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model.loading import load_model
from lorakit.engine.model.losses import batch_loss, loss_head
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import RunError, UserError
from lorakit.settings import TrainSettings

ANSWERS = ["Open Settings, then Reset password.", "The capital of France is Paris.",
           "Your order ships in 3-5 business days.", "Answer A is better. Verdict: A"]


def chat_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        msgs = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": ANSWERS[i % 4]}]
        if i % 2:
            msgs += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
        rows.append({"messages": msgs})
    return rows


def write_data(path, train_rows, valid_rows=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    if valid_rows is not None:
        (path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid_rows))
    return path


def settings(model, data, out, **kw):
    # fixed rows of --batch-size (tests/test_autofit.py covers autofit's layouts)
    base = {"model": str(model), "data": data, "adapter_path": out, "batch_size": 4, "autofit": False, "iters": 4,
            "learning_rate": 1e-3, "steps_per_report": 2, "steps_per_eval": 2, "save_every": 2, "quiet": True}
    return TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"), chat_rows(8), chat_rows(4, offset=50))


def test_lora_run_writes_every_artifact(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, out), rec)
    assert result.steps == 4 and result.epochs == 2.0
    assert result.initial_val_loss > result.best_val_loss  # it learns
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.svg", "report.json",
                 "lorakit.yaml", "best/adapters.safetensors", "best/best.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result.__dict__))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert [r["iteration"] for r in train_rows] == [2, 4]
    assert {"iteration", "epoch", "train_loss", "learning_rate", "tokens_per_second", "trained_tokens",
            "peak_memory", "elapsed"} <= set(train_rows[0])
    assert [r["iteration"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert "<svg" in (out / "loss.svg").read_text() and "best" in (out / "loss.svg").read_text()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["scale"] == 2.0
    assert next(e for e in rec.events if e[0] == "eval")[1]["iteration"] == 0
    with pytest.raises(UserError, match="not empty; pass --resume"):
        train.run(settings(tiny_model, data, out), RecordingReporter())


def test_mlx_lm_loads_and_fuses_the_adapter(tiny_model, data, tmp_path, monkeypatch):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=2, steps_per_eval=100), RecordingReporter())
    x = mx.array([[5, 6, 7, 8, 9]])
    model, _ = load(str(tiny_model), adapter_path=str(out))
    with_adapter = model(x)
    base, _ = load(str(tiny_model))
    assert not mx.allclose(base(x), with_adapter).item()  # the adapter changes the model
    load_adapters(base, str(out))
    assert mx.allclose(base(x), with_adapter).item()
    from mlx_lm import fuse

    monkeypatch.setattr(sys, "argv", ["fuse", "--model", str(tiny_model), "--adapter-path", str(out),
                                      "--save-path", str(tmp_path / "fused")])
    fuse.main()
    fused, _ = load(str(tmp_path / "fused"))
    assert mx.allclose(fused(x), with_adapter, atol=1e-4).item()


@pytest.mark.parametrize("kind, extra", [
    ("dora", {"grad_checkpoint": True, "pack": True, "optimizer": "adam", "lr_schedule": "cosine", "warmup": 1}),
    ("full", {"optimizer": "sgd", "lr_schedule": "linear", "max_grad_norm": 1.0, "learning_rate": 0.05}),
    ("lora", {"optimizer": "adafactor", "num_layers": 1, "target_modules": "attention", "lora_dropout": 0.1}),
])
def test_fine_tune_kinds_train(tiny_model, data, tmp_path, kind, extra):
    result = train.run(settings(tiny_model, data, tmp_path / "ad", fine_tune_type=kind, iters=2,
                                steps_per_eval=100, **extra), RecordingReporter())
    assert result.best_val_loss < result.initial_val_loss
    weights = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    if kind == "full":
        assert result.trainable_parameters == result.total_parameters
    elif kind == "dora":
        assert any(k.endswith(".m") for k in weights)
    else:
        assert all(".layers.1.self_attn." in k for k in weights)


def test_qlora_on_quantized_base(tiny_model_q4, data, tmp_path):
    result = train.run(settings(tiny_model_q4, data, tmp_path / "ad", iters=2, steps_per_eval=100),
                       RecordingReporter())
    assert result.best_val_loss < result.initial_val_loss


def test_packed_and_unpacked_losses_agree(tiny_model, data):
    loaded = load_model(TrainSettings(model=str(tiny_model), data=data))
    examples = load_split(data, "train", loaded.tokenizer, "auto", 512).examples
    head = loss_head(loaded.model)
    assert head == "tied"
    totals = {}
    for pack in (False, True):
        for use_head in (head, None):
            plan = BatchPlan(examples, 2, 512, pack=pack)
            if pack:
                assert len(plan.rows) < len(examples)  # several examples share a row
            loss = ntoks = 0.0
            for b in range(len(plan)):
                l, n = batch_loss(loaded.model, plan.build(b).to_mx(), use_head)
                loss, ntoks = loss + l.item(), ntoks + n.item()
            totals[pack, use_head] = (loss, ntoks)
    ref_loss, ref_toks = totals[False, None]
    for loss, toks in totals.values():
        assert toks == ref_toks
        assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_accumulation_matches_one_big_batch(tiny_model, tmp_path):
    data = write_data(tmp_path / "d", chat_rows(4))
    weights = {}
    for name, bs, accum in (("big", 4, 1), ("accum", 2, 2)):
        train.run(settings(tiny_model, data, tmp_path / name, batch_size=bs, grad_accumulation_steps=accum,
                           iters=1, optimizer="sgd", learning_rate=0.5), RecordingReporter())
        weights[name] = mx.load(str(tmp_path / name / "adapters.safetensors"))
    moved = 0.0
    for key, w in weights["big"].items():
        np.testing.assert_allclose(np.array(weights["accum"][key]), np.array(w), rtol=1e-5, atol=1e-7)
        moved += float(mx.abs(w).sum()) if key.endswith("lora_b") else 0.0
    assert moved > 0  # the update really happened (lora_b starts at zero)


def test_best_checkpoint_and_early_stopping(tiny_model, tmp_path):
    # Training on one answer and validating on a different one: validation only gets worse after a while.
    train_rows = [{"prompt": f"Q{i}", "completion": "yes yes yes yes"} for i in range(8)]
    valid_rows = [{"prompt": f"Q{i}", "completion": "no no no no"} for i in range(4)]
    data = write_data(tmp_path / "d", train_rows, valid_rows)
    out = tmp_path / "ad"
    result = train.run(settings(tiny_model, data, out, iters=30, steps_per_eval=1, save_every=100,
                                learning_rate=0.02, early_stopping_patience=2), RecordingReporter())
    assert result.stopped_early and result.steps < 30
    assert result.steps == result.best_step + 2  # two evaluations without improvement
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": result.best_step, "val_loss": result.best_val_loss}
    assert ckpt.list_checkpoints(out)[-1].name == f"step-{result.steps:06d}"


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_checkpoint(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    with pytest.raises(RunError, match=r"step \d+: the loss or gradients are not finite") as info:
        train.run(settings(tiny_model, data, out, iters=6, save_every=1, optimizer="sgd", learning_rate=1e30),
                  RecordingReporter())
    assert info.value.exit_code == 1 and "--learning-rate" in str(info.value)
    saved = ckpt.list_checkpoints(out)
    assert saved and all(ckpt.problem(p) is None for p in saved)
    assert str(saved[-1]) in str(info.value)
    assert not (out / "adapters.safetensors").exists()  # no final adapter from a failed run
