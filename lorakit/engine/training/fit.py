"""Autofit: the fastest layout that fits --max-memory, chosen by measuring steps (lorakit.engine.training.probe).

Candidates come from lorakit.engine.training.layout, fastest first; the first whose measured peak stays under
HEADROOM x the budget is the run's. Fields the user set are never changed; with none left to choose (or
--no-autofit) nothing is measured unless --plan asks for the numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import mlx.core as mx
from mlx import nn

from lorakit.engine.data.batching import BatchPlan, filling_pays_off
from lorakit.engine.data.tokenized import Split
from lorakit.engine.reporter import Reporter
from lorakit.engine.training.layout import Layout, budgets, candidates, free_fields, packing, step_tokens
from lorakit.engine.training.lean import use_swiglu_recompute
from lorakit.engine.training.probe import Measured, measure
from lorakit.engine.training.speedups import use_grad_checkpoint, use_mlp_recompute
from lorakit.errors import UserError
from lorakit.settings import TrainSettings

HEADROOM = 0.9  # other batch shapes and validation may need a little more than the probed one
QUEUE_LIMIT = 0.8  # MLX's memory limit, as a share of --max-memory (see queue_limit)
SHALLOW_QUEUE_OPS = "8"  # kernels per CUDA graph under --max-memory (MLX's default: 20; see shallow_queue)


@dataclass
class Choice:
    layout: Layout
    budget_bytes: int
    by_autofit: bool
    measured: Measured | None = None  # the chosen layout's probe (None: not measured)
    tried: list[tuple[Layout, Measured]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def usable_memory() -> int:
    """Bytes the device reports as safely usable (Metal: the recommended working set; else 90% of its memory,
    or MLX's own limit on the CPU, whichever is lower than the RAM available now)."""
    info = mx.device_info()
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"])
    for key in ("total_memory", "memory_size"):
        if info.get(key):
            return int(0.9 * info[key])
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + mx.get_active_memory()
    except (ValueError, OSError):
        available = mx.get_memory_limit()
    return int(min(mx.get_memory_limit(), available))


def choose(settings: TrainSettings, model: nn.Module, head: str | None, train_set: Split, timed: bool,
           reporter: Reporter) -> Choice:
    """The layout to train with (grad checkpointing applied to `model` when it needs it)."""
    lengths = [e.length for e in train_set.examples]
    budget = int(settings.max_memory * 1e9) if settings.max_memory else usable_memory()
    options = candidates(settings, lengths)
    choice = Choice(layout=options[0], budget_bytes=budget, by_autofit=len(options) > 1 or bool(
        free_fields(settings)), reasons=_data_reasons(settings, lengths))
    if len(options) == 1 and not timed:
        _apply(model, options[0])
        return choice
    with queue_limit(settings):  # probes measure the peak the run will have
        for layout in options:
            _apply(model, layout)
            plan = layout_plan(settings, train_set, layout)
            reporter.log(f"measuring {layout.flags()}: {3 if timed else 2} steps on its heaviest batch (the "
                         "first compiles)")
            measured = measure(model, head, settings, plan, layout.grad_accumulation_steps, timed)
            choice.tried.append((layout, measured))
            if not measured.out_of_memory and (measured.peak_bytes <= HEADROOM * budget or len(options) == 1):
                choice.layout, choice.measured = layout, measured
                _fewer_mlps(settings, model, head, train_set, timed, reporter, choice)
                return choice
    smallest, natural = choice.tried[-1]
    if settings.max_memory is not None:
        # the advice needs the smallest layout's peak without the queue limit: a budget above it fits for sure
        natural = measure(model, head, settings, layout_plan(settings, train_set, smallest),
                          smallest.grad_accumulation_steps, False)
    raise _too_small(settings, budget, smallest, natural, lengths)


def _fewer_mlps(settings: TrainSettings, model: nn.Module, head: str | None, train_set: Split, timed: bool,
                reporter: Reporter, choice: Choice) -> None:
    """When recomputing every MLP fits and recomputing none did not, recompute only as many blocks' MLPs as
    the budget needs: each block saves about the same, so the peaks around the budget tell how many."""
    if "recompute_mlp_blocks" not in free_fields(settings) or len(choice.tried) < 2:
        return
    (none, over), (every, fits) = choice.tried[-2:]
    blocks = len(model.layers)
    if not (every.recompute_mlp and every.recompute_mlp_blocks is None and not over.out_of_memory
            and none == replace(every, recompute_mlp=False) and over.peak_bytes > fits.peak_bytes):
        return
    target = HEADROOM * choice.budget_bytes
    low, high = (0, over.peak_bytes), (blocks, fits.peak_bytes)  # (recomputed blocks, peak): over / under
    for _ in range(3):  # a few probes, each placed where the line through the bracket meets the budget
        share = (low[1] - target) / (low[1] - high[1])
        count = min(max(low[0] + math.ceil(share * (high[0] - low[0])), low[0] + 1), high[0] - 1)
        if count <= low[0]:
            break
        layout = replace(every, recompute_mlp_blocks=count)
        _apply(model, layout)
        reporter.log(f"measuring {layout.flags()}: {3 if timed else 2} steps on its heaviest batch")
        measured = measure(model, head, settings, layout_plan(settings, train_set, layout),
                           layout.grad_accumulation_steps, timed)
        choice.tried.append((layout, measured))
        if measured.out_of_memory or measured.peak_bytes > target:
            low = (count, measured.peak_bytes if not measured.out_of_memory else low[1])
        else:
            high = (count, measured.peak_bytes)
            choice.layout, choice.measured = layout, measured
    _apply(model, choice.layout)


def shallow_queue(max_memory: float | None) -> None:
    """With --max-memory on CUDA, MLX submits smaller CUDA graphs. It frees a kernel's buffers only once the
    kernel's whole graph has run, with up to 10 graphs in flight: 20-kernel graphs hold GBs of finished work
    (8B, 4 x 1024 tokens: ~6 GB) for a few % of speed. MLX reads this once, at its first GPU work, so it is
    set before the model loads; an MLX_MAX_OPS_PER_BUFFER of the user's stays. (20-kernel graphs under a 0.8x
    limit instead stall at the limit: slower on the 8B shape, benchmarks/README.md.)"""
    if max_memory is not None and mx.cuda.is_available():
        os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", SHALLOW_QUEUE_OPS)


def _shallow() -> bool:
    """Whether the CUDA queue is shallow (it then holds little ahead, and the limit is only a backstop at the
    budget itself)."""
    ops = os.environ.get("MLX_MAX_OPS_PER_BUFFER", "")
    return mx.cuda.is_available() and ops.isdigit() and int(ops) <= int(SHALLOW_QUEUE_OPS)


@contextlib.contextmanager
def queue_limit(settings: TrainSettings) -> Iterator[None]:
    """With --max-memory, MLX's memory limit: above it MLX waits for queued GPU work to finish (and free its
    buffers) before encoding more. Without it the CPU runs ahead and allocates the outputs of work queued
    many layers ahead: on an H200, 5 GB of a Llama-1B step's 26 GB, and more with de-quantized weights."""
    if settings.max_memory is None:
        yield
        return
    share = 1.0 if _shallow() else QUEUE_LIMIT
    previous = mx.set_memory_limit(int(share * settings.max_memory * 1e9))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def layout_plan(settings: TrainSettings, train_set: Split, layout: Layout) -> BatchPlan:
    return BatchPlan(train_set.examples, settings.batch_size, settings.max_seq_length, pack=layout.pack,
                     seed=settings.seed, batch_tokens=layout.batch_tokens, fill=filling_pays_off())


def _apply(model: nn.Module, layout: Layout) -> None:
    """The layout's recomputation in the backward pass: whole blocks, or (some of) their MLPs, or the SwiGLU
    products, or none."""
    use_grad_checkpoint(model, False)  # off first: the MLP classes change underneath
    use_mlp_recompute(model, False)
    use_swiglu_recompute(model, layout.recompute_swiglu)
    use_grad_checkpoint(model, layout.grad_checkpoint)
    use_mlp_recompute(model, layout.recompute_mlp and not layout.grad_checkpoint, layout.recompute_mlp_blocks)


def _data_reasons(settings: TrainSettings, lengths: list[int]) -> list[str]:
    free = free_fields(settings)
    budgeted = budgets(free)
    reasons = [packing(settings, lengths)[1]] if "pack" in free and budgeted else []
    if budgeted:
        reasons.append(f"token budgets keep --batch-size {settings.batch_size} x "
                       f"{settings.grad_accumulation_steps} examples' worth of tokens per optimizer step "
                       f"({step_tokens(settings, lengths):,})")
    return reasons


def _too_small(settings: TrainSettings, budget: int, smallest: Layout, measured: Measured,
               lengths: list[int]) -> UserError:
    """Exit 2: even the smallest layout does not fit; name the budget that would."""
    peak = measured.peak_bytes
    enough = float(f"{peak * 1.1 / HEADROOM / 1e9:.2g}") * 1.1  # a margin: peaks vary a little run to run
    need = ("even the smallest layout ran out of memory" if measured.out_of_memory else
            f"the smallest layout ({smallest.flags()}) measured {peak / 1e9:.3g} GB, so pass --max-memory "
            f"{enough:.2g} or more")
    return UserError(f"--max-memory {budget / 1e9:.3g} GB is too small for this run: {need}; or lower "
                     f"--max-seq-length (now {settings.max_seq_length}, longest example {max(lengths)} tokens), "
                     "--lora-rank or --num-layers, or quantize the base (--quantize 4)")
