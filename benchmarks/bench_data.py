"""Synthetic chat data for the training benchmark: token ids drawn directly, with a prompt and a completion part.

- uniform: every example 900-1100 tokens (about 1000), the completion 50-70% of it.
- longtail: lengths from a log-normal (median 300) clipped to 50-2000 tokens, completion 30-80% of it.
A fixed seed makes every process (and both trainers) see the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Example:
    tokens: list[int]
    prompt_len: int  # tokens before the completion; with --mask-prompt they carry no loss


def make(kind: str, count: int, vocab_size: int, max_len: int, seed: int = 0, scale: float = 1.0) -> list[Example]:
    """`count` examples; `scale` shrinks lengths (CPU runs), keeping the distribution's shape."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        lengths = rng.integers(900, 1101, size=count)
        completion_share = rng.uniform(0.5, 0.7, size=count)
    elif kind == "longtail":
        lengths = np.clip(rng.lognormal(mean=np.log(300), sigma=0.9, size=count), 50, 2000).astype(int)
        completion_share = rng.uniform(0.3, 0.8, size=count)
    else:
        raise ValueError(f"--data {kind}: expected uniform or longtail")
    lengths = np.clip((lengths * scale).astype(int), 8, max_len)
    low = min(16, vocab_size // 4)  # keep clear of special-token ids at the start of the vocabulary
    examples = []
    for length, share in zip(lengths, completion_share):
        tokens = rng.integers(low, vocab_size, size=int(length)).tolist()
        prompt_len = max(1, int(length - round(length * share)))
        examples.append(Example(tokens, min(prompt_len, int(length) - 1)))
    return examples


def loss_tokens(ex: Example, mask_prompt: bool) -> int:
    """Targets that carry loss: next-token predictions inside the example (no padding, no position past the end)."""
    return len(ex.tokens) - (ex.prompt_len if mask_prompt else 1)


def summary(examples: list[Example], mask_prompt: bool) -> dict:
    lengths = np.array([len(e.tokens) for e in examples])
    return {
        "examples": len(examples),
        "mean_len": float(lengths.mean()),
        "min_len": int(lengths.min()),
        "max_len": int(lengths.max()),
        "loss_tokens": int(sum(loss_tokens(e, mask_prompt) for e in examples)),
    }
