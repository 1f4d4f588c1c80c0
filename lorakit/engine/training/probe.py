"""Measure a training step for real before the run: its peak memory, its compile time and its step time.

The probe runs the compiled step (forward, backward, optimizer update) on the heaviest batch of a layout
with a throwaway optimizer, then puts the trainable weights back: the run that follows starts exactly where
it would have without the probe (each training step seeds the random state itself).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map

from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.training import failures
from lorakit.engine.training.objective import SFT
from lorakit.engine.training.optimizer import make_optimizer
from lorakit.engine.training.steps import compile_steps
from lorakit.settings import TrainSettings


@dataclass
class Measured:
    peak_bytes: int  # the step's peak, weights and optimizer state included; 0 when it ran out of memory
    first_s: float  # the first call: compilation and one step
    step_s: float | None  # a compiled step (None: not timed)
    padded_tokens: int  # of the probed micro-batch
    out_of_memory: bool = False

    @property
    def compile_s(self) -> float:
        return max(0.0, self.first_s - (self.step_s or 0.0))


def heaviest_batch(plan: BatchPlan) -> int:
    """The batch most likely to set the peak: most padded tokens, wider rows weighing more (attention)."""
    def weight(b: int) -> float:
        width = plan.width(b)
        return plan.batch_rows(b) * width * (1 + width / 4096)

    return max(range(len(plan.batches)), key=weight)


def measure(model: nn.Module, head: str | None, settings: TrainSettings, plan: BatchPlan, accum: int,
            timed: bool) -> Measured:
    """Two steps of `accum` micro-batches (all the heaviest batch) with a fresh optimizer; `timed`: a third,
    for the step time. The trainable weights are restored afterwards."""
    batch = plan.build(heaviest_batch(plan))
    arrays = batch.to_mx()
    weights = tree_map(lambda x: x, model.trainable_parameters())
    optimizer = make_optimizer(settings, 1000)
    optimizer.init(model.trainable_parameters())
    steps = compile_steps(model, optimizer, SFT(head).loss, settings.max_grad_norm)
    mx.eval(steps.state)
    gc.collect()  # dead arrays held by reference cycles (e.g. an earlier run's) would count in the peak
    mx.clear_cache()
    mx.reset_peak_memory()
    times: list[float] = []
    try:
        for _ in range(3 if timed else 2):  # a compiled step's later calls may peak higher than its first
            tic = time.perf_counter()
            _one_step(steps, arrays, accum)
            times.append(time.perf_counter() - tic)
        peak, oom = mx.get_peak_memory(), False
    except (MemoryError, RuntimeError) as e:
        if not failures.is_oom(e):
            raise
        peak, oom = 0, True
    finally:
        model.update(weights)
        del steps, optimizer
        mx.clear_cache()
    return Measured(peak_bytes=peak, first_s=times[0] if times else 0.0,
                    step_s=min(times[1:]) if timed and len(times) > 1 else None,
                    padded_tokens=int(batch.inputs.size) * accum, out_of_memory=oom)


def _one_step(steps, arrays: dict, accum: int) -> None:
    if accum == 1:
        mx.eval(steps.state, steps.full(arrays))
        return
    grad, tokens = None, None
    for _ in range(accum):
        _, n, _, grad = steps.micro(arrays, grad)
        tokens = n if tokens is None else tokens + n
        mx.eval(grad, tokens)
    mx.eval(steps.state, steps.apply(grad, tokens))
