"""How a run's batches are laid out, and the layouts autofit tries, fastest first.

A layout is packing, the size of a micro-batch (a token budget, or a number of rows), gradient accumulation
and gradient checkpointing. Every candidate keeps the effective batch the user asked for with --batch-size
and --grad-accumulation-steps:
- micro-batches get a token budget: that many examples of the split's mean (padded) length per optimizer
  step. A long-tailed split then gets steps of about the same size (a batch of short examples holds many of
  them) and about as many optimizer steps per epoch as fixed batches give, which keeps learning rates and
  schedules comparable;
- with --pack given (or --no-autofit): --batch-size rows per optimizer step, as asked (accumulation splits
  them evenly).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from lorakit.engine.data.batching import bucket
from lorakit.settings import TrainSettings

FIELDS = ("pack", "batch_size", "batch_tokens", "grad_accumulation_steps", "recompute_mlp", "grad_checkpoint",
          "recompute_mlp_blocks", "recompute_swiglu")
MAX_ACCUMULATION = 64


@dataclass(frozen=True)
class Layout:
    pack: bool
    batch_size: int  # rows per micro-batch when batch_tokens is None
    batch_tokens: int | None
    grad_accumulation_steps: int
    recompute_mlp: bool
    grad_checkpoint: bool
    recompute_mlp_blocks: int | None = None  # with recompute_mlp: only the first N blocks' MLPs (None: all)
    recompute_swiglu: bool = False

    @classmethod
    def of(cls, settings: TrainSettings) -> Layout:
        return cls(**{name: getattr(settings, name) for name in FIELDS})

    def update(self) -> dict:
        """The settings fields this layout sets."""
        return {name: getattr(self, name) for name in FIELDS}

    def flags(self) -> str:
        """The flags that ask for this layout."""
        size = f"--batch-tokens {self.batch_tokens}" if self.batch_tokens else f"--batch-size {self.batch_size}"
        return " ".join(["--pack" if self.pack else "--no-pack", size,
                         f"--grad-accumulation-steps {self.grad_accumulation_steps}",
                         "--recompute-swiglu" if self.recompute_swiglu else "--no-recompute-swiglu",
                         _recompute_flags(self),
                         "--grad-checkpoint" if self.grad_checkpoint else "--no-grad-checkpoint"])


def _recompute_flags(layout: Layout) -> str:
    if not layout.recompute_mlp:
        return "--no-recompute-mlp"
    blocks = layout.recompute_mlp_blocks
    return "--recompute-mlp" if blocks is None else f"--recompute-mlp --recompute-mlp-blocks {blocks}"


def budgets(free: set[str]) -> bool:
    """Whether micro-batches get token budgets: unless the user packs (then --batch-size counts packed rows,
    and autofit packing rows of --batch-size would hold far more examples than asked) or sets a budget."""
    return {"pack", "batch_tokens"} <= free


def free_fields(settings: TrainSettings) -> set[str]:
    """The layout fields autofit may choose: those no flag, env variable or config file set."""
    if not settings.autofit:
        return set()
    fixed = settings.model_fields_set | (set() if settings.lean_activations else {"recompute_swiglu"})
    return set(FIELDS) - fixed


def packing(settings: TrainSettings, lengths: list[int]) -> tuple[bool, str]:
    """Whether to pack, and why. Packing pays when lengths spread widely (the longest over twice the median:
    it saves padding and compilations) and a step's tokens fill at least one row of --max-seq-length."""
    median, longest = statistics.median(lengths), max(lengths)
    shape = f"median {median:g}, longest {longest} tokens"
    if longest <= 2 * median:
        return False, f"lengths are even ({shape}): not packed"
    tokens = step_tokens(settings, lengths)
    if tokens < settings.max_seq_length:
        return False, (f"lengths are long-tailed ({shape}) but a step's {tokens:,} tokens would not fill one "
                       f"packed row of --max-seq-length {settings.max_seq_length}: not packed")
    return True, f"lengths are long-tailed ({shape}): packed into rows of {settings.max_seq_length}"


def step_tokens(settings: TrainSettings, lengths: list[int]) -> int:
    """Tokens per optimizer step the user asked for: --batch-size x accumulation examples of mean length
    (padded as a batch pads them, since budgets count padded tokens)."""
    asked = settings.batch_size * settings.grad_accumulation_steps
    padded = (min(bucket(max(n - 1, 1)), settings.max_seq_length) for n in lengths)
    return max(1, round(asked * statistics.fmean(padded)))


def candidates(settings: TrainSettings, lengths: list[int], free: set[str] | None = None) -> list[Layout]:
    """The layouts to try, fastest first; the first is the one to use when memory is plentiful.

    Free fields vary (`free` overrides which are): packing is chosen from the data (no probe), then the
    largest micro-batch without checkpointing, the same with checkpointing, then smaller micro-batches with
    more accumulation down to one longest row each. Fields the user set stay as set.
    """
    free = free_fields(settings) if free is None else free
    asked = Layout.of(settings)
    if not free:
        return [asked]
    budgeted = budgets(free)
    base = replace(asked, pack=packing(settings, lengths)[0]) if "pack" in free and budgeted else asked
    row = _longest_row(settings, lengths, base.pack)
    whole = _whole_step(settings, lengths, base, budgeted)
    # an explicit --batch-tokens is the micro-batch: accumulation then stays as asked
    split = "grad_accumulation_steps" in free and (budgeted or asked.batch_tokens is None)
    accums = _powers_of_two(MAX_ACCUMULATION) if split else [asked.grad_accumulation_steps]
    levels = _recompute_levels(asked, free)
    found: list[Layout] = []
    seen: set[tuple[tuple[bool, bool, bool], int]] = set()
    for level in levels:
        for accum in accums:
            swiglu, mlp, checkpoint = level
            layout = _split(replace(whole, recompute_swiglu=swiglu, recompute_mlp=mlp, grad_checkpoint=checkpoint,
                                    recompute_mlp_blocks=whole.recompute_mlp_blocks if mlp else None), accum)
            size = layout and largest_micro_batch(layout, row)
            if layout and (level, size) not in seen:  # more accumulation that shrinks nothing: no use
                seen.add((level, size))
                found.append(layout)
            if level != levels[-1]:
                break  # only the largest micro-batch before the last level: recomputing saves more first
    return found


def _recompute_levels(asked: Layout, free: set[str]) -> list[tuple[bool, bool, bool]]:
    """(recompute_swiglu, recompute_mlp, grad_checkpoint) from least to most recomputation, as the free
    fields allow: the SwiGLU product first (cheapest), then whole MLPs, then whole blocks."""
    swiglu = [False, True] if "recompute_swiglu" in free else [asked.recompute_swiglu]
    mlp = [False, True] if "recompute_mlp" in free else [asked.recompute_mlp]
    full = [False, True] if "grad_checkpoint" in free else [asked.grad_checkpoint]
    levels = []
    if False in full:
        levels += [(s, mlp[0], False) for s in swiglu] + [(swiglu[-1], m, False) for m in mlp[1:]]
    if True in full:
        levels.append((swiglu[0], mlp[0], True))
    return levels


def _whole_step(settings: TrainSettings, lengths: list[int], base: Layout, budgeted: bool) -> Layout:
    """One optimizer step as one micro-batch: the step's token budget, or all its rows (an explicit
    --batch-tokens stays the micro-batch it is)."""
    if budgeted:
        return replace(base, batch_tokens=step_tokens(settings, lengths), grad_accumulation_steps=1)
    if base.batch_tokens is not None:
        return base
    return replace(base, batch_size=base.batch_size * base.grad_accumulation_steps, grad_accumulation_steps=1)


def smaller_layout(settings: TrainSettings, lengths: list[int]) -> Layout | None:
    """The next layout down autofit's ladder from the one in use (packing and tokens per optimizer step as
    they are): checkpointing first, then smaller micro-batches with more accumulation."""
    now = Layout.of(settings)
    row = _longest_row(settings, lengths, now.pack)
    full = replace(now, recompute_mlp=False, grad_checkpoint=True, recompute_mlp_blocks=None)
    all_mlps = replace(now, recompute_mlp=True, recompute_mlp_blocks=None, recompute_swiglu=True)
    options = [] if now.grad_checkpoint else [replace(now, recompute_swiglu=True), all_mlps]
    options += [] if now.grad_checkpoint else [full]
    options += [_split(full, a) for a in _powers_of_two(MAX_ACCUMULATION) if a > now.grad_accumulation_steps]
    for layout in options:
        if layout and (_recomputes(layout) > _recomputes(now)
                       or largest_micro_batch(layout, row) < largest_micro_batch(now, row)):
            return layout
    return None


def _recomputes(layout: Layout) -> float:
    if layout.grad_checkpoint:
        return 2
    if layout.recompute_mlp:
        return 0.75 if layout.recompute_mlp_blocks else 1
    return 0.5 if layout.recompute_swiglu else 0


def _split(layout: Layout, accum: int) -> Layout | None:
    """The same optimizer step in `accum` micro-batches (None: its rows do not split evenly)."""
    if accum == layout.grad_accumulation_steps:
        return layout
    if layout.batch_tokens is not None:
        total = layout.batch_tokens * layout.grad_accumulation_steps
        return replace(layout, batch_tokens=-(-total // accum), grad_accumulation_steps=accum)
    rows = layout.batch_size * layout.grad_accumulation_steps
    return replace(layout, batch_size=rows // accum, grad_accumulation_steps=accum) if rows % accum == 0 else None


def largest_micro_batch(layout: Layout, row: int) -> int:
    """About the most padded tokens one micro-batch holds (`row`: padded tokens of the longest row)."""
    if layout.batch_tokens is None:
        return layout.batch_size * row
    return max(1, round(layout.batch_tokens / row)) * row if layout.pack else max(layout.batch_tokens, row)


def _longest_row(settings: TrainSettings, lengths: list[int], pack: bool) -> int:
    """Padded tokens of the longest row (a full one when packing): no micro-batch can be smaller."""
    longest = settings.max_seq_length if pack else min(max(lengths), settings.max_seq_length + 1) - 1
    return min(bucket(max(longest, 1)), settings.max_seq_length)


def _powers_of_two(limit: int) -> list[int]:
    return [2 ** k for k in range(limit.bit_length()) if 2 ** k <= limit]
