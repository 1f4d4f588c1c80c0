"""Autofit, --plan, token-budget batches, compile warm-up and the out-of-memory message (tiny model, CPU)."""

import json
import os
import random

import mlx.core as mx
import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine import train
from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.data.tokenized import TokenizedExample
from lorakit.engine.reporter import RecordingReporter
from lorakit.engine.training import failures
from lorakit.engine.training.fit import HEADROOM
from lorakit.engine.training.layout import FIELDS, candidates, smaller_layout
from lorakit.engine.training.plan import TrainPlan
from lorakit.errors import RunError, UserError
from lorakit.settings import TrainSettings

WORDS = "the quick brown fox jumps over lazy dog reset my password please thank you order ships".split()


def write_long_tail(path, n_train=48, n_valid=6, seed=0):
    """Text records with long-tailed lengths: most short, a few long (as chat data usually is)."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        lines = []
        for i in range(n):
            words = 8 + int(rng.paretovariate(1.3) * 6) if i % 8 else 150 + i
            lines.append(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(min(words, 220)))}))
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_long_tail(tmp_path_factory.mktemp("longtail"))


def settings(model, data, out, **kw):
    base = {"model": str(model), "data": data, "adapter_path": out, "iters": 3, "learning_rate": 1e-3,
            "steps_per_report": 1, "steps_per_eval": 100, "val_batches": 1, "quiet": True}
    return TrainSettings(**{**base, **kw})


def saved_layout(out):
    saved = yaml.safe_load((out / "lorakit.yaml").read_text())
    return {name: saved[name] for name in FIELDS}


@pytest.mark.parametrize("layout", [
    {},  # autofit's choice
    {"batch_size": 2, "grad_checkpoint": True},
    {"pack": True, "batch_size": 1, "max_seq_length": 512},
    {"batch_tokens": 600, "grad_accumulation_steps": 2},
])
def test_plan_predicts_the_peak_of_the_run_within_15_percent(tiny_model, data, tmp_path, layout):
    out = tmp_path / "run"
    layout = {"iters": None, "epochs": 1, **layout}  # one epoch: every batch shape, the heaviest too
    plan = train.run(settings(tiny_model, data, out, plan=True, **layout), RecordingReporter())
    assert isinstance(plan, TrainPlan) and not out.exists()  # --plan writes nothing
    assert plan.fits and plan.compiled_shapes >= 1 and plan.step_time_s > 0
    # the run with the planned layout as explicit flags (no probe of its own), measured on its own
    chosen = _parse_flags(plan.layout)
    result = train.run(settings(tiny_model, data, out, autofit=False, **{**layout, **chosen}),
                       RecordingReporter())
    assert result.steps == plan.steps
    assert abs(plan.peak_memory_gb - result.peak_memory_gb) <= 0.15 * result.peak_memory_gb, (plan, result)


def _parse_flags(flags: str) -> dict:
    words, parsed = flags.split(), {}
    for i, word in enumerate(words):
        name = word[2:].replace("-", "_")
        if word.startswith("--no-"):
            parsed[name[3:]] = False
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            parsed[name] = int(words[i + 1])
        elif word.startswith("--"):
            parsed[name] = True
    return parsed


def test_a_smaller_max_memory_changes_the_layout_and_the_run_stays_under_it(tiny_model, data, tmp_path):
    roomy = train.run(settings(tiny_model, data, tmp_path / "p", plan=True), RecordingReporter())
    assert "--no-grad-checkpoint" in roomy.layout and roomy.tried[0]["layout"] == roomy.layout
    lean = train.run(settings(tiny_model, data, tmp_path / "p", plan=True, grad_checkpoint=True),
                     RecordingReporter())
    assert lean.peak_memory_gb < roomy.peak_memory_gb
    budget = (roomy.peak_memory_gb + lean.peak_memory_gb) / 2 / HEADROOM  # fits the lean one only
    out = tmp_path / "run"
    result = train.run(settings(tiny_model, data, out, max_memory=budget, iters=None, epochs=1),
                       RecordingReporter())
    saved = saved_layout(out)
    assert result.layout != roomy.layout and (saved["grad_checkpoint"] or saved["recompute_mlp"]
                                              or saved["recompute_swiglu"])
    assert result.peak_memory_gb <= budget


def test_max_memory_bounds_mlx_queue_for_the_probes_and_the_run_only(tiny_model, data, tmp_path):
    from lorakit.engine.training import fit

    before = mx.get_memory_limit()
    with fit.queue_limit(settings(tiny_model, data, tmp_path / "run", max_memory=3.0)):
        assert mx.get_memory_limit() == int(fit.QUEUE_LIMIT * 3.0e9)
    assert mx.get_memory_limit() == before
    with fit.queue_limit(settings(tiny_model, data, tmp_path / "run")):
        assert mx.get_memory_limit() == before  # no --max-memory: MLX's own limit


@pytest.mark.parametrize(("ops", "share"), [(None, 1.0), ("8", 1.0), ("4", 1.0), ("20", "QUEUE_LIMIT")])
def test_on_cuda_a_shallow_queue_is_limited_at_the_budget_and_a_deep_one_below_it(tiny_model, data, tmp_path,
                                                                                  monkeypatch, ops, share):
    from lorakit.engine.training import fit

    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "")  # restored (or removed) after the test
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    if ops is not None:  # the user's own depth stays; without one, --max-memory makes the queue shallow
        monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", ops)
    fit.shallow_queue(3.0)
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == (ops or fit.SHALLOW_QUEUE_OPS)
    share = fit.QUEUE_LIMIT if share == "QUEUE_LIMIT" else share
    with fit.queue_limit(settings(tiny_model, data, tmp_path / "run", max_memory=3.0)):
        assert mx.get_memory_limit() == int(share * 3.0e9)


def test_without_max_memory_the_queue_keeps_mlx_depth(monkeypatch):
    from lorakit.engine.training import fit

    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "")  # restored (or removed) after the test
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    fit.shallow_queue(None)
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ


def test_an_impossible_budget_exits_2_with_the_smallest_that_fits(tiny_model, data, tmp_path):
    with pytest.raises(UserError) as caught:
        train.run(settings(tiny_model, data, tmp_path / "run", max_memory=0.001), RecordingReporter())
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "--max-memory 0.001 GB is too small" in message
    enough = float(message.split("so pass --max-memory ")[1].split()[0])
    assert not (tmp_path / "run").exists()
    plan = train.run(settings(tiny_model, data, tmp_path / "run", max_memory=enough, plan=True),
                     RecordingReporter())
    assert plan.fits


def test_the_probe_leaves_the_run_as_it_would_be_without_it(tiny_model, data, tmp_path):
    import mlx.core as mx

    first = tmp_path / "autofit"
    train.run(settings(tiny_model, data, first, iters=4), RecordingReporter())
    layout = saved_layout(first)
    assert layout["batch_tokens"] is not None  # no size flag given: token budgets
    second = tmp_path / "explicit"
    train.run(settings(tiny_model, data, second, iters=4, autofit=False, **layout), RecordingReporter())
    a, b = mx.load(str(first / "adapters.safetensors")), mx.load(str(second / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_resume_keeps_the_layout_autofit_chose(tiny_model, data, tmp_path):
    import mlx.core as mx

    straight = tmp_path / "straight"
    train.run(settings(tiny_model, data, straight, iters=4, save_every=2), RecordingReporter())
    resumed = tmp_path / "resumed"
    train.run(settings(tiny_model, data, resumed, iters=2, save_every=2), RecordingReporter())
    # resumed with a budget that would make autofit choose differently: the run keeps its own layout
    train.run(settings(tiny_model, data, resumed, iters=4, save_every=2, resume=True, max_memory=0.001),
              RecordingReporter())
    a, b = mx.load(str(straight / "adapters.safetensors")), mx.load(str(resumed / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert saved_layout(straight) == saved_layout(resumed)


def test_batch_size_sets_the_tokens_per_step_and_pack_keeps_its_rows(tiny_model, data, tmp_path):
    budgeted = train.run(settings(tiny_model, data, tmp_path / "a", batch_size=8, plan=True), RecordingReporter())
    four = train.run(settings(tiny_model, data, tmp_path / "a", batch_size=4, plan=True), RecordingReporter())
    assert "--batch-tokens 1040" in budgeted.layout and "--batch-tokens 520" in four.layout
    assert budgeted.tokens_per_step > 1.5 * four.tokens_per_step  # less than 2x: longest rows go alone
    out = tmp_path / "run"
    result = train.run(settings(tiny_model, data, out, pack=True, batch_size=2, max_seq_length=512),
                       RecordingReporter())
    assert saved_layout(out)["batch_tokens"] is None and saved_layout(out)["batch_size"] == 2
    assert result.layout.startswith("--pack --batch-size 2")


def test_warm_up_is_shown_and_reported_apart(tiny_model, data, tmp_path):
    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, tmp_path / "run", iters=12), rec)
    phases = [value for kind, value in rec.events if kind == "phase"]
    assert phases.count("compiling") == result.compiled_shapes >= 1
    assert phases.count(None) == phases.count("compiling")  # each compiling step ends its phase
    assert result.warmup_s > 0 and result.steady_tokens_per_second > 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["compiled_shapes"] == result.compiled_shapes and report["layout"] == result.layout


def examples(lengths):
    return [TokenizedExample(tokens=list(range(n)), mask=[True] * n) for n in lengths]


def test_token_budget_batches_hold_every_example_once_within_the_budget():
    lengths = [5, 7, 9, 12, 30, 31, 33, 40, 64, 100, 250, 600, 9, 8, 14, 17]
    plan = BatchPlan(examples(lengths), 4, 512, batch_tokens=256, seed=3)
    seen = sorted(i for rows in plan.batches for row in rows for i in row)
    assert seen == list(range(len(lengths)))
    for b, rows in enumerate(plan.batches):
        assert len(rows) == 1 or (len(rows) - 0.5) * plan.width(b) <= 256  # the nearest to the budget
    assert max(len(rows) for rows in plan.batches) > 4  # short examples share a batch
    assert sum(1 for _ in range(len(plan))) == len(plan.order(0))


def test_candidates_keep_the_tokens_per_step_and_go_from_fast_to_small():
    s = TrainSettings(model="m", data="d", max_seq_length=512)
    lengths = [100] * 40 + [500] * 4
    found = candidates(s, lengths)
    assert not found[0].grad_checkpoint and not found[0].recompute_mlp and not found[0].recompute_swiglu
    # the SwiGLU products first, then the MLPs, then whole blocks
    assert found[1].recompute_swiglu and not found[1].recompute_mlp and not found[1].grad_checkpoint
    assert found[2].recompute_swiglu and found[2].recompute_mlp and not found[2].grad_checkpoint
    assert all(c.grad_checkpoint for c in found[3:])
    totals = {c.batch_tokens * c.grad_accumulation_steps for c in found}
    assert max(totals) - min(totals) < max(c.grad_accumulation_steps for c in found)  # rounding only
    assert found[0].pack  # long-tailed, and a step fills a row of 512


def test_out_of_memory_mid_run_keeps_checkpoints_and_names_the_next_layout(tiny_model, data, tmp_path,
                                                                           monkeypatch):
    from lorakit.engine.training.trainer import Trainer

    real_step = Trainer.step

    def step(self):
        if self.state.step == 2:
            raise RuntimeError("[malloc] Unable to allocate 123456789 bytes: out of memory")
        real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "run"
    with pytest.raises(RunError) as caught:
        train.run(settings(tiny_model, data, out, iters=4, save_every=2), RecordingReporter())
    message = str(caught.value)
    assert caught.value.exit_code == 1 and "out of memory at step 3" in message
    assert "--recompute-swiglu --no-recompute-mlp --no-grad-checkpoint (the next smaller layout" in message
    assert "lorakit train --plan" in message
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_smaller_layout_ends_at_one_row_per_micro_batch():
    s = TrainSettings(model="m", data="d", batch_size=1, grad_checkpoint=True, grad_accumulation_steps=4)
    assert smaller_layout(s, [50] * 10) is None
    message = str(failures.oom_error(RuntimeError("out of memory"), s, 7, [50] * 10))
    assert "--max-seq-length 1024" in message and "next smaller layout" not in message


def test_cli_plan_prints_a_table_or_json_and_writes_nothing(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    args = ["train", "-m", str(tiny_model), "--data", str(data), "--adapter-path", str(out), "--iters", "2",
            "--plan"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "peak memory" in table.stdout and "autofit" in table.stdout
    plain = CliRunner().invoke(app, [*args, "--json"])
    plan = json.loads(plain.stdout)
    assert plan["fits"] and plan["peak_memory_gb"] > 0 and plan["tried"]
    assert not out.exists()


def test_an_explicit_accumulation_is_kept_and_splits_the_step():
    s = TrainSettings(model="m", data="d", grad_accumulation_steps=4, max_seq_length=512)
    found = candidates(s, [100] * 50 + [500] * 5)
    assert {c.grad_accumulation_steps for c in found} == {4}
    step = TrainSettings(model="m", data="d", batch_size=16, max_seq_length=512)
    whole = candidates(step, [100] * 50 + [500] * 5)[0].batch_tokens  # the same step in one micro-batch
    assert 0 <= found[0].batch_tokens * 4 - whole < 4


def test_a_budget_between_no_and_full_mlp_recomputation_recomputes_only_some_blocks(
        tiny_model, data, tmp_path, monkeypatch):
    from lorakit.engine.training import fit

    monkeypatch.setattr(fit, "QUEUE_LIMIT", 100.0)  # no queue throttle: the budget run measures as the others
    lean = train.run(settings(tiny_model, data, tmp_path / "p", plan=True, recompute_swiglu=True),
                     RecordingReporter())
    every = train.run(settings(tiny_model, data, tmp_path / "p", plan=True, recompute_swiglu=True,
                               recompute_mlp=True), RecordingReporter())
    assert every.peak_memory_gb < lean.peak_memory_gb
    budget = (0.6 * lean.peak_memory_gb + 0.4 * every.peak_memory_gb) / HEADROOM  # one block of two
    plan = train.run(settings(tiny_model, data, tmp_path / "p", plan=True, max_memory=budget),
                     RecordingReporter())
    assert plan.tried[2]["layout"].endswith("--recompute-mlp --no-grad-checkpoint")  # every MLP first
    blocks = _parse_flags(plan.layout).get("recompute_mlp_blocks", 0)
    assert 1 <= blocks < 2, plan.layout  # the tiny model has two blocks
    assert plan.peak_memory_gb <= HEADROOM * budget


def test_recompute_mlp_blocks_implies_recompute_mlp_and_shows_in_the_flags(tiny_model, data, tmp_path):
    chosen = settings(tiny_model, data, tmp_path, recompute_mlp_blocks=3)
    assert chosen.recompute_mlp and "recompute_mlp" in chosen.model_fields_set
    assert "--recompute-mlp --recompute-mlp-blocks 3" in candidates(chosen, [10, 20, 30])[0].flags()
    with pytest.raises(ValueError, match="needs --recompute-mlp"):
        settings(tiny_model, data, tmp_path, recompute_mlp_blocks=3, recompute_mlp=False)
