"""Examples -> padded batches: sorted by length, shuffled per epoch by seed, optionally packed.

- Rows: one example per row, or with `pack` several examples per row (best-fit decreasing) whose inputs
  fill at most max_seq_length positions, kept apart in attention by `PackedMask` (the per-layer stand-in
  cache that mlx-lm models consult for their attention mask).
- Batches: rows sorted by length and cut into batches of `batch_size`, so each batch pads little; or, with
  a token budget (`batch_tokens`), as many rows per batch as fit in rows x padded length <= budget, so a
  batch of short examples holds many of them and each step carries about the same number of tokens. The
  order of batches is a permutation drawn from (seed, epoch), so any position (epoch, index) can be
  resumed without stored RNG state.
- Shapes are rounded up to buckets (8 per octave, at least 32; multiples of 128 from 512 up) so the
  compiled step re-traces rarely. MLX's fused CUDA attention (cuDNN) has a backward pass only for lengths
  that are multiples of 128; otherwise it falls back to attention that stores B x H x T x T scores.
- In a plan for the compiled train step on CUDA (`fill`), a batch whose shape no other batch has (an epoch's
  short last batch) is filled with empty rows up to the next shape of its width (`fill_leftovers`).
- `Batch.positions` lists the flat indices of loss-bearing targets (padded to 1/4, 1/2 or 3/4 of the
  batch's positions) when they are under 3/4 of the batch: the loss then projects only those hidden states onto the vocabulary.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from lorakit.engine.data.tokenized import TokenizedExample

# Gather loss positions, padded to the first of these shares of the batch that holds them; above the
# last share the loss projects every position.
GATHER_SHARES = (0.25, 0.5, 0.75)


def filling_pays_off() -> bool:
    """Whether a compilation of the train step costs more than a few empty rows each epoch: on CUDA (Llama-1B on
    an H200: 0.5 s against 0.13 s steps), not on the CPU (SmolLM2-135M: 1.6 s against 3.2 s steps) nor, not
    measured, on Metal, whose steps are slow next to its compiles as well."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def bucket(n: int, minimum: int = 32) -> int:
    """Round n up to a size with 8 steps per power of two (at least `minimum`, 128 above 512)."""
    if n <= minimum:
        return minimum
    step = max(minimum if n <= 512 else 128, 2 ** (math.floor(math.log2(n)) - 3))
    return -(-n // step) * step


@dataclass
class Batch:
    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32: inputs shifted by one
    weights: np.ndarray  # (B, T) float32: 1 where the target carries loss
    segments: np.ndarray | None  # (B, T) int32: example number within the row (packing), 0 = padding
    positions: np.ndarray | None  # (K,) int32: flat loss positions, padded with weight-0 entries
    examples: int
    n_positions: int = 0  # real entries at the front of positions
    reference: np.ndarray | None = None  # (S,) float32: each sequence's reference log-prob (preference training)
    sequence_of: np.ndarray | None = None  # (B, T) int32: which of the batch's S sequences a target belongs to

    @property
    def loss_tokens(self) -> int:
        return int(self.weights.sum())

    def to_mx(self) -> dict[str, mx.array | None]:
        out: dict[str, mx.array | None] = {"inputs": mx.array(self.inputs), "segments": None, "positions": None}
        if self.positions is not None:
            weights = self.weights.reshape(-1)[self.positions]
            weights[self.n_positions:] = 0
            out["positions"] = mx.array(self.positions)
            out["targets"] = mx.array(self.targets.reshape(-1)[self.positions])
            out["weights"] = mx.array(weights)
        else:
            out["targets"] = mx.array(self.targets)
            out["weights"] = mx.array(self.weights)
        if self.segments is not None:
            out["segments"] = mx.array(self.segments)
        if self.reference is not None:
            out["reference"] = mx.array(self.reference)
        if self.sequence_of is not None:
            flat = self.sequence_of.reshape(-1)
            out["sequence_of"] = mx.array(flat[self.positions] if self.positions is not None else flat)
            out["sequences"] = mx.arange(int(self.sequence_of.max()) + 1)
        return out


class PackedMask:
    """Stand-in per-layer cache: keys/values pass through; the mask is causal within each example only."""

    offset = 0

    def __init__(self, segments: mx.array) -> None:
        self.segments = segments

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        idx = mx.arange(n)
        causal = idx[:, None] >= idx[None, :]
        if window_size is not None:
            causal = causal & (idx[:, None] < idx[None, :] + window_size)
        same = self.segments[:, :, None] == self.segments[:, None, :]
        return mx.expand_dims(same & causal, 1)


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example goes to the fullest row that still has room for it."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row number)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - lengths[i], r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
    return rows


def _width(longest: int, max_seq_length: int) -> int:
    """Tokens per row of a batch whose longest row holds `longest` tokens (inputs and the last target)."""
    return min(bucket(longest - 1), max_seq_length) + 1


def _budget_batches(rows: list[list[int]], lengths: list[int], budget: int, width_of: Callable[[int], int]
                    ) -> list[list[list[int]]]:
    """Consecutive rows (sorted by length) per batch while rows x padded length stays nearest `budget`: a row
    joins when the batch is then closer to the budget than without it (a long row may get a batch alone)."""
    batches: list[list[list[int]]] = []
    for row, length in zip(rows, lengths):
        width = width_of(length) - 1
        if batches and (len(batches[-1]) + 0.5) * width <= budget:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


class BatchPlan:
    """Fixed rows and batches for a split; `order(epoch)` gives that epoch's batch order."""

    def __init__(self, examples: list[TokenizedExample], batch_size: int, max_seq_length: int, *, pack: bool = False,
                 seed: int = 0, shuffle: bool = True, batch_tokens: int | None = None, fill: bool = False) -> None:
        self.examples = examples
        self.fill = fill
        self.pack = pack
        self.seed = seed
        self.shuffle = shuffle
        self.max_seq_length = max_seq_length
        lengths = [e.length for e in examples]
        # a packed row holds max_seq_length + 1 tokens: its inputs (all but the last) fill max_seq_length
        rows = _pack(lengths, max_seq_length + 1) if pack else [[i] for i in range(len(examples))]
        row_len = [sum(lengths[i] for i in row) for row in rows]
        by_length = sorted(range(len(rows)), key=lambda r: (row_len[r], r))
        rows = [rows[r] for r in by_length]
        self.rows = rows
        if batch_tokens is None:
            self.batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
        else:
            self.batches = _budget_batches(rows, [row_len[r] for r in by_length], batch_tokens, self._row_width)
        self.fill_leftovers()

    def _rows(self, b: int) -> list[list[int]]:
        """Batch b's rows, each a list of example numbers."""
        return self.batches[b]

    def width(self, b: int) -> int:
        """The padded length (inputs) of batch b."""
        return self._row_width(max(sum(self.examples[i].length for i in row) for row in self._rows(b))) - 1

    def _row_width(self, longest: int) -> int:
        """Tokens per row; packed rows over half full are padded to full length (one shape, one compile)."""
        if self.pack and 2 * longest > self.max_seq_length:
            return self.max_seq_length + 1
        return _width(longest, self.max_seq_length)

    def batch_rows(self, b: int) -> int:
        """The rows batch b is built with: its own, or more where `fill_leftovers` adds empty ones."""
        return self.filled.get(b, len(self._rows(b)))

    def shapes(self) -> set[tuple[int, int]]:
        """The distinct (rows, padded length) of the batches: each is one compilation of the step."""
        return {(self.batch_rows(b), self.width(b)) for b in range(len(self.batches))}

    def fill_leftovers(self) -> None:
        """With `fill` (plans for the compiled train step): build each batch whose shape is the only one of its
        kind with empty rows (no loss: results stay the same) up to the fewest rows of a shape of its width that
        is compiled anyway, if that at most doubles it: one compilation fewer, for part of a step per epoch.
        Called again when the batches change."""
        self.filled: dict[int, int] = {}  # batch -> rows it is built with
        if not self.fill:
            return
        shape = [(len(self._rows(b)), self.width(b)) for b in range(len(self.batches))]
        shapes = Counter(shape)
        compiled: set[tuple[int, int]] = set()
        grown: dict[tuple[int, int], int] = {}
        for rows, width in sorted(shapes, reverse=True):  # most rows first: they are the ones to grow into
            roomy = [n for n, w in compiled if w == width and rows < n <= 2 * rows]
            if shapes[rows, width] == 1 and roomy:
                grown[rows, width] = min(roomy)
            else:
                compiled.add((rows, width))
        self.filled = {b: grown[s] for b, s in enumerate(shape) if s in grown}

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.batches)))
        return [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))]

    def iterate(self, epoch: int = 0, index: int = 0) -> Iterator[tuple[int, int, Batch]]:
        """Yield (epoch, index within the epoch, batch) from a position on, looping over epochs."""
        while True:
            order = self.order(epoch)
            for i in range(index, len(order)):
                yield epoch, i, self.build(order[i])
            epoch, index = epoch + 1, 0

    def build(self, b: int) -> Batch:
        return self.build_rows(self._rows(b), n_rows=self.batch_rows(b))

    def build_rows(self, rows: list[list[int]], order: list[int] | None = None, n_rows: int = 0) -> Batch:
        """A padded batch of these rows (each a list of example numbers packed into one row), with empty rows
        after them up to `n_rows`. `order` lists the batch's examples in the order their `sequence_of` numbers
        them (None: no sequence numbers)."""
        seqs = [[self.examples[i] for i in row] for row in rows]
        width = self._row_width(max(sum(e.length for e in row) for row in seqs))
        shape = (max(n_rows, len(rows)), width)
        tokens = np.zeros(shape, np.int32)
        mask = np.zeros(shape, bool)
        segments = np.zeros(shape, np.int32)
        sequence_of = np.zeros(shape, np.int32)
        number = {example: n for n, example in enumerate(order or [])}
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row, 1):
                ex = self.examples[i]
                tokens[r, at: at + ex.length] = ex.tokens
                mask[r, at: at + ex.length] = ex.mask
                segments[r, at: at + ex.length] = s
                sequence_of[r, at: at + ex.length] = number.get(i, 0)
                at += ex.length
        weights = mask[:, 1:].astype(np.float32)
        batch = Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=weights,
                      segments=segments[:, :-1] if self.pack else None, positions=None,
                      examples=sum(len(row) for row in rows),
                      sequence_of=sequence_of[:, :-1] if order is not None else None)
        flat = np.flatnonzero(weights.reshape(-1)).astype(np.int32)
        # a few sizes per batch shape (not one per count), so the compiled step rarely re-traces; the share is
        # taken of the batch's own rows, so a batch filled with empty rows gathers as the batches it joins do
        for share in GATHER_SHARES:
            k = int(weights.size * share)
            if len(flat) <= len(rows) * weights.shape[1] * share:
                batch.positions = np.concatenate([flat, np.zeros(k - len(flat), np.int32)])
                batch.n_positions = len(flat)
                break
        return batch


class PairPlan(BatchPlan):
    """A preference split's plan: its examples come as (chosen, rejected) pairs, 2i and 2i + 1.

    A batch holds `batch_size` pairs, so a pair is always in one batch (and, under data parallelism, on one
    rank: `batches` lists pairs); pairs are sorted by their longer reply, like rows of a BatchPlan. Unpacked,
    each pair is two adjacent rows (chosen, rejected); with `pack` the batch's replies are packed into rows of
    max_seq_length (best fit, kept apart in attention). Either way `sequence_of` numbers each target's
    sequence: 2j the chosen and 2j + 1 the rejected reply of the batch's pair j. `reference` holds every
    example's reference log-probability (DPO), which each batch carries in that order.
    """

    def __init__(self, examples: list[TokenizedExample], batch_size: int, max_seq_length: int, *, seed: int = 0,
                 shuffle: bool = True, reference: np.ndarray | None = None, pack: bool = False,
                 fill: bool = False) -> None:
        self.examples, self.pack, self.seed, self.shuffle, self.fill = examples, pack, seed, shuffle, fill
        self.max_seq_length, self.reference = max_seq_length, reference
        longest = [max(examples[2 * p].length, examples[2 * p + 1].length) for p in range(len(examples) // 2)]
        pairs = [(2 * p, 2 * p + 1) for p in sorted(range(len(longest)), key=lambda p: (longest[p], p))]
        self.rows = [[i] for pair in pairs for i in pair]
        self.batches = [pairs[i: i + batch_size] for i in range(0, len(pairs), batch_size)]
        self.fill_leftovers()

    def _rows(self, b: int) -> list[list[int]]:
        """The batch's rows: one reply each, or (packed) several."""
        order = [i for pair in self.batches[b] for i in pair]
        if not self.pack:
            return [[i] for i in order]
        packed = _pack([self.examples[i].length for i in order], self.max_seq_length + 1)
        return [[order[k] for k in row] for row in packed]

    def build(self, b: int) -> Batch:
        order = [i for pair in self.batches[b] for i in pair]
        batch = self.build_rows(self._rows(b), order, self.batch_rows(b))
        if self.reference is not None:
            batch.reference = self.reference[order].astype(np.float32)
        return batch
