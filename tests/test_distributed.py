"""Data-parallel training with 2 local processes on the ring backend (CPU), against a single process.

The launches run `lorakit train` as a user would: through `mlx.launch -n 2 --backend ring`, or (for the
lost-rank tests) as two processes started by hand with the same environment mlx.launch gives them, so
that no launcher stops the survivor for us.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.engine.model.distributed import World, check_batch_size, check_resume_world, lost_rank_errors
from lorakit.errors import RunError, UserError

LAUNCH = Path(sys.executable).parent / "mlx.launch"
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _write_data(directory: Path, n_train: int = 24, n_valid: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    questions = ["What is the capital of France?", "How do I reset my password?", "Which answer is better?",
                 "Say a number.", "Write add(a, b) in Python."]
    answers = ["The capital of France is Paris.", "Open Settings, choose Account, then Reset password.",
               "Answer A is better because it is correct and concise. Verdict: A", "42",
               "def add(a, b):\n    return a + b"]

    def example(i: int) -> dict:
        q, a = questions[i % len(questions)], answers[(i * 3) % len(answers)]
        return {"messages": [{"role": "user", "content": q + " " * (i % 4) + str(i)},
                             {"role": "assistant", "content": (a + " ") * (1 + i % 3)}]}

    for name, rows in (("train", range(n_train)), ("valid", range(100, 100 + n_valid))):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(example(i)) + "\n" for i in rows))
    return directory


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
            "--iters", "6", "--batch-size", "4", "--no-autofit", "--learning-rate", "1e-3", "--seed", "3",
            "--steps-per-report", "2", "--steps-per-eval", "3", "--val-batches", "2", "--save-every", "3",
            "--max-seq-length", "64", "--json", *extra]


def _launch_ring(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
           "--", sys.executable, "-m", "lorakit", *args]
    return subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=timeout)


def _start_ranks(args: list[str], tmp: Path) -> list[subprocess.Popen]:
    """Two ranks started the way mlx.launch starts them (MLX_HOSTFILE + MLX_RANK), without its supervision."""
    port = _free_port_pair()
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _weights(adapter_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(adapter_dir / "adapters.safetensors")).items()}


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# --- the pieces, on a pretend world (no processes needed) ---

def test_shard_takes_every_size_th_row_and_covers_the_batch():
    rows = list(range(8))
    shards = [World(None, rank, 2).shard(rows) for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert World(None, 0, 1).shard(rows) == rows


def test_batch_size_must_split_over_the_processes():
    check_batch_size(4, World(None, 0, 2))
    with pytest.raises(UserError, match=r"--batch-size 3 does not split over 2 processes.*multiple of 2"):
        check_batch_size(3, World(None, 1, 2))


def test_resume_needs_the_same_number_of_processes(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2}))
    check_resume_world(tmp_path, World(None, 0, 2))
    with pytest.raises(UserError, match=r"2 process\(es\), this run has 1; resume it under `mlx.launch -n 2"):
        check_resume_world(tmp_path, World(None, 0, 1))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3}))  # from before world size was recorded
    check_resume_world(tmp_path, World(None, 0, 1))
    with pytest.raises(UserError, match=r"resume it as a single process \(without mlx.launch\)"):
        check_resume_world(tmp_path, World(None, 1, 2))


def test_backend_failure_becomes_a_run_error_only_when_distributed():
    lost = r"rank 1 of 2: lost contact with another process \(\[ring\] connection"
    with pytest.raises(RunError, match=lost), lost_rank_errors(World(None, 1, 2)):
        raise RuntimeError("[ring] connection to a peer was lost")
    with pytest.raises(RuntimeError, match="unrelated"), lost_rank_errors(World(None, 0, 2)):
        raise RuntimeError("unrelated")


def test_watchdog_ends_a_stuck_process_with_a_message():
    code = ("import time, lorakit.engine\n"
            "from lorakit.engine.model.distributed import World, watchdog\n"
            "with watchdog(World(None, 1, 2), 1.0) as beat:\n"
            "    beat(); time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert time.monotonic() - start < 20
    assert "rank 1 of 2: no training progress for" in proc.stderr
    assert "--dist-timeout 1" in proc.stderr


# --- real processes on the ring backend ---

def test_ring_sums_and_averages_across_two_processes(tmp_path):
    script = tmp_path / "sums.py"
    script.write_text(
        "import lorakit.engine\nimport mlx.core as mx\n"
        "from lorakit.engine.model.distributed import check_same, world\n"
        "from lorakit.errors import UserError\n"
        "w = world()\n"
        "grads = w.average_gradients({'a': mx.full((3,), float(w.rank + 1)), 'b': [mx.array([2.0 * w.rank])]})\n"
        "print('RESULT', w.rank, w.size, w.sum_floats(1.0, w.rank), grads['a'].tolist(), grads['b'][0].item())\n"
        "check_same(w, {'same': 7}, 'fine')\n"
        "try:\n"
        "    check_same(w, {'same': 7, 'resume step': 10 * w.rank}, 'copy the checkpoint')\n"
        "except UserError as e:\n"
        "    print('REFUSED', w.rank, e)\n")
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
           "--", sys.executable, str(script)]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=120)
    results = sorted(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert results == ["RESULT 0 2 [2.0, 1.0] [1.5, 1.5, 1.5] 1.0",
                       "RESULT 1 2 [2.0, 1.0] [1.5, 1.5, 1.5] 1.0"], proc.stdout + proc.stderr
    refused = sorted(line for line in proc.stdout.splitlines() if line.startswith("REFUSED"))
    assert refused == [f"REFUSED {r} the 2 processes disagree on the resume step (rank 0: 0, rank 1: 10); "
                       "copy the checkpoint" for r in (0, 1)], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_rank_run(tiny_model, tmp_path_factory):
    """The same training as one process and as two ring ranks (global batch 4, seed 3)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _write_data(tmp / "data")
    single = CliRunner().invoke(app, _train_args(tiny_model, data, tmp / "single"))
    assert single.exit_code == 0, single.stderr
    ranks = _launch_ring(_train_args(tiny_model, data, tmp / "double"))
    return tmp, data, single, ranks


def test_two_ranks_train_the_same_adapter_as_one_process(two_rank_run):
    tmp, _, _, ranks = two_rank_run
    assert "error" not in ranks.stderr.lower(), ranks.stderr
    one, two = _weights(tmp / "single"), _weights(tmp / "double")
    assert one.keys() == two.keys() and one
    for key in one:  # Adam divides by sqrt(v): float-rounding differences in tiny gradients grow a little
        np.testing.assert_allclose(two[key], one[key], rtol=1e-3, atol=5e-5, err_msg=key)
    # the LoRA B matrices start at zero: equal and non-zero means the updates matched
    assert any(np.abs(v).max() > 1e-4 for k, v in one.items() if k.endswith("lora_b"))


def test_only_rank_zero_prints_the_result_and_reduced_metrics_match(two_rank_run):
    _, _, single, ranks = two_rank_run
    results = _json_lines(ranks.stdout)
    assert len(results) == 1, ranks.stdout  # one JSON object on stdout, from rank 0 only
    one = json.loads(single.stdout)
    two = results[0]
    for key in ("final_train_loss", "final_val_loss", "best_val_loss", "initial_val_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert two["trained_tokens"] == one["trained_tokens"]
    assert two.get("world_size") == 2


def test_resume_refuses_another_number_of_processes(two_rank_run, tiny_model):
    tmp, data, _, _ = two_rank_run
    result = CliRunner().invoke(app, _train_args(tiny_model, data, tmp / "double", "--resume", "--iters", "9"))
    assert result.exit_code == 2, result.stderr
    assert "mlx.launch -n 2" in result.stderr


def test_resume_continues_with_the_same_processes_and_ctrl_c_on_one_rank_stops_both(two_rank_run, tiny_model):
    tmp, data, _, _ = two_rank_run
    out = tmp / "double"
    rank0, rank1 = _start_ranks(_train_args(tiny_model, data, out, "--resume", "--iters", "100000"), tmp)
    try:  # the run resumes at step 6; a checkpoint at step 9 shows that it went on from there
        _wait_for_checkpoint(out, 9, [rank0, rank1])
        rank1.send_signal(signal.SIGINT)  # only one rank sees the Ctrl-C
        outputs = [p.communicate(timeout=60) for p in (rank0, rank1)]
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [rank0.returncode, rank1.returncode] == [130, 130], outputs
    saved = re.search(r"interrupted: saved checkpoint at step (\d+)", outputs[0][1])
    assert saved, outputs[0][1]
    state = json.loads((out / "checkpoints" / f"step-{int(saved[1]):06d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert state["step"] == int(saved[1]) > 9


def _wait_for_checkpoint(out: Path, min_step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Wait until a checkpoint of step >= min_step exists (rotation may already have removed earlier ones)."""
    def found() -> bool:
        return any(int(p.parent.name.split("-")[1]) >= min_step
                   for p in (out / "checkpoints").glob("step-*/trainer_state.json"))

    deadline = time.monotonic() + timeout
    while not found() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "\n".join(o[1] for o in [p.communicate() for p in procs])
        time.sleep(0.1)
    assert found(), f"no checkpoint of step >= {min_step} appeared under {out}"


@pytest.mark.parametrize("how", ["killed", "stuck"])
def test_a_lost_rank_makes_the_other_exit_with_a_clear_message(how, tiny_model, tmp_path):
    data = _write_data(tmp_path / "data")
    out = tmp_path / "out"
    # 20 s: long enough for the first steps' compiles on a slow 2-core machine, short enough for a test
    args = _train_args(tiny_model, data, out, "--iters", "100000", "--save-every", "2", "--dist-timeout", "20")
    rank0, rank1 = _start_ranks(args, tmp_path)
    try:
        _wait_for_checkpoint(out, 2, [rank0, rank1])
        rank1.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, stderr = rank0.communicate(timeout=90)
        waited = time.monotonic() - start
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert rank0.returncode == 1, stderr
    if how == "killed":  # the ring backend sees the closed socket (or, where it keeps waiting, the watchdog)
        assert ("rank 0 of 2: lost contact with another process" in stderr
                or "rank 0 of 2: no training progress for" in stderr), stderr
        assert waited < 45
    else:  # a stopped peer keeps its sockets open: only the watchdog ends the wait
        assert "rank 0 of 2: no training progress for" in stderr
        assert 19 < waited < 85
    assert "resume with --resume under the same mlx.launch -n 2" in stderr
