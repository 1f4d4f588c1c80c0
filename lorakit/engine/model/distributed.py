"""Data-parallel training on `mx.distributed`: who am I, this rank's share of a batch, sums across ranks,
and what happens when another rank is lost.

`mlx.launch -n N ...` (ring or MPI on CPUs and Macs, NCCL on NVIDIA GPUs) starts the same `lorakit train`
N times; `mx.distributed.init()` joins them into one group, and without a launcher it is a group of one, so
the same code path runs either way. Every rank builds the same shuffled batch order and takes its share of
each global batch; gradients and metrics are summed across ranks; only rank 0 writes or reports anything.

Collectives never name a stream: each backend then picks its own communication stream (CPU for ring and
MPI, the GPU for NCCL). Passing `stream=mx.cpu` under NCCL fails in MLX 0.32.4 with "There is no
Stream(gpu, 1) in current thread" (mlx-lm 0.32.2's validation dies that way).

A lost rank: the ring backend notices a closed socket and raises ("[ring] connection to a peer was lost"),
which `lost_rank_errors` turns into a RunError that says what happened. NCCL, and a peer that hangs
instead of dying, leave the others blocked inside the collective forever, where no Python signal handler
runs; `watchdog` starts a thread that ends the process when the training loop stops making progress.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx
from mlx.nn import average_gradients

from lorakit.engine.reporter import Reporter
from lorakit.errors import RunError, UserError
from lorakit.io import read_json

T = TypeVar("T")
_BACKEND_ERRORS = ("[ring]", "[nccl]", "[mpi]", "[jaccl]")


@dataclass(frozen=True)
class World:
    """The processes training together: this one is `rank` of `size` (a group of one without mlx.launch)."""

    group: Any
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def shard(self, rows: list[T]) -> list[T]:
        """This rank's rows of a global batch: every size-th row, so that each share spans all lengths."""
        return rows[self.rank::self.size]

    def sum(self, x: mx.array) -> mx.array:
        """Sum `x` over all ranks (lazy; a no-op for one process)."""
        if not self.is_distributed:
            return x
        return mx.distributed.all_sum(x, group=self.group)

    def sum_floats(self, *values: float) -> list[float]:
        """Sum a few Python numbers over all ranks in one collective."""
        if not self.is_distributed:
            return [float(v) for v in values]
        return self.sum(mx.array(values, dtype=mx.float32)).tolist()

    def average_gradients(self, grads: Any) -> Any:
        """The mean of each gradient over all ranks (mlx.nn.average_gradients, batched into few collectives)."""
        if not self.is_distributed:
            return grads
        return average_gradients(grads, group=self.group)

    def reporter(self, reporter: Reporter) -> Reporter:
        """The reporter for this rank: rank 0 reports, the others stay silent."""
        return reporter if self.is_main else Reporter()

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


@functools.cache
def world() -> World:
    """Join the group that mlx.launch started (any backend it set up), once per process."""
    group = mx.distributed.init()
    return World(group=group, rank=group.rank(), size=group.size())


def shard_plan(plan: Any, w: World, reporter: Reporter, split: str) -> None:
    """Keep this rank's rows of every batch of a BatchPlan, so each rank builds (and pads) only its share.

    A last batch with fewer rows than ranks cannot give every rank a row; it is left out (and said so).
    """
    if not w.is_distributed:
        return
    kept = [rows for rows in plan.batches if len(rows) >= w.size]
    left_out = sum(len(rows) for rows in plan.batches) - sum(len(rows) for rows in kept)
    if left_out:
        reporter.warn(f"{split}: {left_out} row(s) in a last batch smaller than the {w.size} processes are left "
                      "out of every epoch; a --batch-size that divides the number of examples avoids it")
    plan.batches = [w.shard(rows) for rows in kept]
    plan.fill_leftovers()


def check_batch_size(batch_size: int, w: World) -> None:
    """Each rank takes an equal share of every batch, so the global batch must split evenly."""
    if batch_size % w.size:
        raise UserError(f"--batch-size {batch_size} does not split over {w.size} processes (mlx.launch -n {w.size}): "
                        f"each process takes an equal share of every batch; pass a multiple of {w.size}")


def check_resume_world(checkpoint: Path, w: World) -> None:
    """A checkpoint resumes only under the number of processes that wrote it (recorded in its trainer state)."""
    from lorakit.engine.model.checkpoint import STATE_FILE

    recorded = read_json(Path(checkpoint) / STATE_FILE).get("world_size") or 1
    if recorded != w.size:
        how = f"under `mlx.launch -n {recorded} ...`" if recorded > 1 else "as a single process (without mlx.launch)"
        raise UserError(f"--resume: checkpoint {checkpoint} was written by a run of {recorded} process(es), this run "
                        f"has {w.size}; resume it {how}, or start over with --overwrite")


def check_same(w: World, values: dict[str, int], hint: str) -> None:
    """Refuse to go on unless every rank has the same `values` (e.g. the step it resumes from)."""
    if not w.is_distributed:
        return
    mine = mx.zeros((w.size, len(values)), dtype=mx.int32)
    mine[w.rank] = mx.array(list(values.values()), dtype=mx.int32)
    table = w.sum(mine).tolist()  # an all-gather made of an all-sum, which every backend has
    for i, name in enumerate(values):
        seen = [row[i] for row in table]
        if len(set(seen)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
            raise UserError(f"the {w.size} processes disagree on the {name} ({per_rank}); {hint}")


@contextlib.contextmanager
def lost_rank_errors(w: World) -> Iterator[None]:
    """Turn a backend's 'peer lost' failure into a RunError that says what happened and what to do."""
    try:
        yield
    except RuntimeError as e:
        if not (w.is_distributed and str(e).startswith(_BACKEND_ERRORS)):
            raise
        raise RunError(f"{w.describe()}: lost contact with another process ({e}); it probably failed or was "
                       "killed: see its error above. Nothing was saved after the last checkpoint; resume with "
                       f"--resume under the same mlx.launch -n {w.size}") from None


@contextlib.contextmanager
def watchdog(w: World, timeout: float) -> Iterator[Callable[[], None]]:
    """Yield `beat`; end this process (exit code 1) when `beat` was not called for `timeout` seconds.

    Runs only with several ranks. The training loop beats once per step and per validation batch; the first
    step also waits for every rank to load the model and compile, so `timeout` must cover that too.
    """
    last = [time.monotonic()]
    stop = threading.Event()

    def beat() -> None:
        last[0] = time.monotonic()

    def watch() -> None:
        while not stop.wait(min(5.0, timeout / 4)):
            idle = time.monotonic() - last[0]
            if idle > timeout:
                # The main thread is stuck inside a collective (C++), where no exception or signal reaches it.
                sys.stderr.write(
                    f"error: {w.describe()}: no training progress for {idle:.0f} s (--dist-timeout {timeout:g}): "
                    "another process died or hangs, so this one stops too. Checkpoints up to the last save are "
                    f"intact; resume with --resume under the same mlx.launch -n {w.size}\n")
                sys.stderr.flush()
                os._exit(1)

    if w.is_distributed:
        threading.Thread(target=watch, name="lorakit-watchdog", daemon=True).start()
    try:
        yield beat
    finally:
        stop.set()
