"""What a train run keeps when things go wrong: no non-finite (or blown-up) weights in any kept checkpoint,
best/ or adapter; strict JSON reports; --overwrite that deletes nothing until the new run is in place; inputs
never inside the output; one run per --adapter-path; leftovers of killed runs; cut metrics lines; --num-layers
beyond the model; file modes."""

import json
import os
import socket
import stat
import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine import train
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.reporter import RecordingReporter
from lorakit.engine.training import optimizer as optimizer_module
from lorakit.engine.training.result import TrainResult
from lorakit.errors import Interrupted, RunError, UserError
from lorakit.io import output_lock, staging_dir
from lorakit.settings import TrainSettings

ANSWERS = ["Open Settings, then Reset password.", "The capital of France is Paris.",
           "Your order ships in 3-5 business days.", "Answer A is better. Verdict: A"]


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": ANSWERS[i % 4]}]} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    _write(path / "train.jsonl", _rows(8))
    _write(path / "valid.jsonl", _rows(4))
    return path


@pytest.fixture(scope="module")
def data_no_valid(tmp_path_factory):
    path = tmp_path_factory.mktemp("data_nv")
    _write(path / "train.jsonl", _rows(8))
    return path


def settings(model, data, out, **kw):
    base = {"model": str(model), "data": data, "adapter_path": out, "batch_size": 4, "iters": 2,
            "learning_rate": 1e-3, "steps_per_report": 1, "steps_per_eval": 100, "save_every": 1,
            "keep_last": 2, "quiet": True}
    return TrainSettings(**{**base, **kw})


def strict_json(text):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def assert_all_kept_weights_finite(out, limit=1e6):
    """Every adapter file under `out` outside a suspect checkpoint holds finite, not blown-up weights."""
    for path in out.rglob("adapters.safetensors"):
        if (path.parent / ckpt.SUSPECT).exists():
            continue
        for key, w in mx.load(str(path)).items():
            assert mx.all(mx.isfinite(w)).item(), (path, key)
            assert mx.abs(w).max().item() < limit, (path, key)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def lr_jump(step_from, value):
    """A schedule of 1e-3 that jumps to `value` from the update with 0-based index `step_from` on."""
    def schedule(settings, total_steps):
        return lambda step: mx.where(step >= step_from, mx.array(value), mx.array(1e-3))

    return schedule


# --- 1. non-finite and blown-up steps -----------------------------------------------------------------


def test_blown_up_weights_are_never_resumed_and_resume_with_lower_lr_works(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, keep_last=1), RecordingReporter())
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    # 1e20: the update of step 3 leaves finite weights of ~1e20; the loss on them (step 4) is NaN
    with pytest.raises(RunError) as info:
        train.run(settings(tiny_model, data, out, keep_last=1, iters=6, resume=True, learning_rate=1e20),
                  RecordingReporter())
    msg = str(info.value)
    assert info.value.exit_code == 1 and msg.startswith("step 4: the loss or gradients are not finite")
    assert f"checkpoint {ckpt.checkpoint_dir(out, 3)} holds the weights this step started from" in msg
    assert f"the last good checkpoint is {ckpt.checkpoint_dir(out, 2)}" in msg
    assert f"--config {out / 'lorakit.yaml'} --resume" in msg and (out / "lorakit.yaml").exists()
    assert ckpt.suspect_reason(ckpt.checkpoint_dir(out, 3)) is not None
    # kept despite --keep-last 1: the newest checkpoint was not yet verified when it was written
    assert ckpt.latest_valid(out, RecordingReporter()) == ckpt.checkpoint_dir(out, 2)
    assert_all_kept_weights_finite(out)

    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, out, keep_last=1, iters=6, resume=True), rec)
    assert result.resumed_from == str(ckpt.checkpoint_dir(out, 2)) and result.steps == 6
    warnings = [m for kind, m in rec.events if kind == "warn"]
    assert any("step-000003 is unusable" in m and "not finite" in m for m in warnings)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000006"]
    assert_all_kept_weights_finite(out)
    report = strict_json((out / "report.json").read_text())
    assert report["steps"] == 6 and report["final_train_loss"] is not None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_a_lone_poisoned_checkpoint_is_marked_so_resume_refuses_it(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    with pytest.raises(RunError, match="step 2: the loss or gradients are not finite") as info:
        train.run(settings(tiny_model, data, out, iters=4, learning_rate=1e20), RecordingReporter())
    assert "no good checkpoint is left" in str(info.value)
    with pytest.raises(UserError, match="no intact checkpoint"):
        train.run(settings(tiny_model, data, out, iters=4, resume=True), RecordingReporter())


def test_an_update_to_nan_is_stopped_at_once_even_on_the_last_step(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "ad"
    monkeypatch.setattr(optimizer_module, "lr_schedule", lr_jump(2, float("inf")))  # the 3rd update: inf
    with pytest.raises(RunError) as info:
        train.run(settings(tiny_model, data, out, iters=3, steps_per_eval=1), RecordingReporter())
    msg = str(info.value)
    assert msg.startswith("step 3: the update made") and "NaN or inf" in msg
    assert f"the last good checkpoint is {ckpt.checkpoint_dir(out, 2)}" in msg and "suspect" not in msg
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert not (out / "adapters.safetensors").exists() and not (out / "report.json").exists()
    best = strict_json((out / "best" / "best.json").read_text())
    assert best["step"] <= 2
    assert_all_kept_weights_finite(out)
    monkeypatch.undo()
    result = train.run(settings(tiny_model, data, out, iters=3, steps_per_eval=1, resume=True),
                       RecordingReporter())
    assert result.steps == 3 and result.resumed_from.endswith("step-000002")
    strict_json((out / "report.json").read_text())


def test_a_nan_validation_loss_never_becomes_best(tiny_model, data, tmp_path, monkeypatch):
    out = tmp_path / "ad"
    monkeypatch.setattr(optimizer_module, "lr_schedule", lr_jump(2, 1e20))  # finite ~1e20 weights at step 3
    with pytest.raises(RunError, match=r"step 3: the validation loss is not finite") as info:
        train.run(settings(tiny_model, data, out, iters=3, steps_per_eval=1), RecordingReporter())
    assert f"the last good checkpoint is {ckpt.checkpoint_dir(out, 2)}" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    best = strict_json((out / "best" / "best.json").read_text())
    assert best["step"] <= 2
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "val_loss" in r] == [0, 1, 2]  # the NaN one is not reported
    assert_all_kept_weights_finite(out)


def test_a_blow_up_on_the_last_step_without_validation_is_caught(tiny_model, data_no_valid, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "ad"
    monkeypatch.setattr(optimizer_module, "lr_schedule", lr_jump(2, 1e20))
    with pytest.raises(RunError, match=r"step 3: the loss on the final weights is not finite"):
        train.run(settings(tiny_model, data_no_valid, out, iters=3), RecordingReporter())
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert not (out / "adapters.safetensors").exists()
    assert_all_kept_weights_finite(out)


def test_results_and_json_output_are_strict_json(tiny_model, data, tmp_path):
    fields = {f: 0 for f in TrainResult.__dataclass_fields__}
    result = TrainResult(**{**fields, "best_val_loss": float("nan"), "final_train_loss": float("inf"),
                            "initial_val_loss": 2.5})
    assert result.best_val_loss is None and result.final_train_loss is None and result.initial_val_loss == 2.5
    cli = CliRunner().invoke(app, ["train", "--model", str(tiny_model), "--data", str(data), "--adapter-path",
                                   str(tmp_path / "ad"), "--iters", "2", "--batch-size", "4", "--json"])
    assert cli.exit_code == 0, cli.stderr
    assert strict_json(cli.stdout)["steps"] == 2


# --- 2. --overwrite and outputs that would swallow inputs ---------------------------------------------


def test_failed_overwrite_leaves_the_old_run_untouched(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=2, steps_per_eval=1), RecordingReporter())
    (out / "eval-test").mkdir()
    (out / "eval-test" / "eval.json").write_text("{}")
    before = snapshot(out)
    assert "best/adapters.safetensors" in before and "checkpoints/step-000002/adapters.safetensors" in before
    with pytest.raises(RunError) as info:
        train.run(settings(tiny_model, data, out, iters=4, learning_rate=1e20, overwrite=True),
                  RecordingReporter())
    assert f"the previous contents of {out} are left as they were" in str(info.value)
    assert "staging" not in str(info.value)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no staging directory, no lock left


def test_overwrite_swaps_in_at_the_first_good_checkpoint_and_ctrl_c_resume_hint_holds(tiny_model, data,
                                                                                      tmp_path):
    class InterruptAt(RecordingReporter):
        def advance(self, n=1, **fields):
            if fields.get("loss") is not None and len([e for e in self.events if e[0] == "train"]) == 3:
                raise KeyboardInterrupt

    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=2), RecordingReporter())
    with pytest.raises(Interrupted) as info:
        train.run(settings(tiny_model, data, out, iters=6, overwrite=True, seed=7), InterruptAt())
    assert f"lorakit train --config {out / 'lorakit.yaml'} --resume" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000003"]
    assert not (out / "adapters.safetensors").exists()  # the old run's final adapter went with it
    result = train.run(settings(tiny_model, data, out, iters=6, seed=7, resume=True), RecordingReporter())
    assert result.steps == 6 and result.resumed_from.endswith("step-000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_adapter_path_overlapping_the_data_is_refused(tiny_model, data, tmp_path, where):
    data_copy = tmp_path / "d"
    data_copy.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (data_copy / name).write_bytes((data / name).read_bytes())
    before = snapshot(tmp_path)
    out = {"same": data_copy, "inside": data_copy / "run", "contains": tmp_path}[where]
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model), "--data", str(data_copy),
                                      "--adapter-path", str(out), "--iters", "1", "--overwrite"])
    assert result.exit_code == 2 and "--adapter-path" in result.stderr and "--data" in result.stderr
    assert snapshot(tmp_path) == before and not (data_copy / "run").exists()


# --- 3. one run per --adapter-path --------------------------------------------------------------------


def test_a_second_run_into_a_locked_adapter_path_is_refused(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    args = ["train", "--model", str(tiny_model), "--data", str(data), "--adapter-path", str(out),
            "--iters", "1"]
    with output_lock(out, "--adapter-path"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"pid {os.getpid()}" in result.stderr and "in use" in result.stderr
    assert not out.exists()
    (tmp_path / ".ad.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match=f"in use by another lorakit run \\(pid {os.getppid()}"):
        train.run(settings(tiny_model, data, out), RecordingReporter())
    assert (tmp_path / ".ad.lock").exists()  # not ours: left alone


def test_a_stale_lock_is_taken_over_and_a_killed_runs_leftovers_removed(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=2, steps_per_eval=1), RecordingReporter())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / ".ad.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    leftovers = [staging_dir(ckpt.checkpoint_dir(out, 3)), staging_dir(out / "best"), staging_dir(out)]
    (leftovers[0] / "adapters.safetensors").write_bytes(b"half")
    leftovers.append(out / ".adapters.safetensors.ab_cd123.tmp")
    leftovers[-1].write_bytes(b"half")
    os.replace(out / "best", out / ".best.old")  # killed between the two renames of a best/ swap
    keep = [out / "notes.txt", out / ".eval-test.abcdefgh.staging"]  # not train's: left alone
    keep[0].write_text("mine")
    keep[1].mkdir()
    result = train.run(settings(tiny_model, data, out, iters=3, steps_per_eval=1, resume=True),
                       RecordingReporter())
    assert result.steps == 3
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)
    assert (out / "best" / "adapters.safetensors").exists() and not (out / ".best.old").exists()
    assert not (tmp_path / ".ad.lock").exists()


# --- 4. smaller items -----------------------------------------------------------------------------------


def test_resume_drops_a_cut_last_metrics_line(tiny_model, data, tmp_path):
    out = tmp_path / "ad"
    train.run(settings(tiny_model, data, out, iters=3), RecordingReporter())
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "epoch": 2.0, "train_lo')  # killed while writing the line
    rec = RecordingReporter()
    result = train.run(settings(tiny_model, data, out, iters=5, resume=True), rec)
    assert result.steps == 5
    warnings = [m for kind, m in rec.events if kind == "warn" and "metrics.jsonl" in m]
    assert len(warnings) == 1 and "1 unreadable line" in warnings[0]
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("num_layers", [100, 3, 0, -2])
def test_num_layers_beyond_the_model_is_refused(tiny_model, data, tmp_path, num_layers):
    out = tmp_path / "ad"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model), "--data", str(data),
                                      "--adapter-path", str(out), "--iters", "1",
                                      "--num-layers", str(num_layers)])
    assert result.exit_code == 2
    assert f"--num-layers {num_layers}" in result.stderr and "2 transformer blocks" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umasks_modes(tiny_model, data, tmp_path, umask):
    out = tmp_path / "ad"
    old = os.umask(umask)
    try:
        train.run(settings(tiny_model, data, out, iters=2, steps_per_eval=1), RecordingReporter())
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {"metrics.jsonl", "adapters.safetensors", "optimizer.safetensors", "best", "step-000002",
            "lorakit.yaml", "report.json", "loss.svg"} <= {p.name for p in paths}
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p
