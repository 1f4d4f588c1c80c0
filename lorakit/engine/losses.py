"""Masked, token-weighted cross-entropy: `batch_loss(model, batch, head) -> (loss_sum, n_tokens)`.

The sum (not the mean) comes back so micro-batches and data-parallel shards add up exactly; the caller
divides by the total token count.

`head` says how to project hidden states onto the vocabulary without calling the full model:
"lm_head" (model.lm_head), "tied" (model.model.embed_tokens.as_linear), or None (call model(...) and take
its logits). `loss_head(model)` picks it once and checks numerically that head(model.model(x)) really is
model(x) (models that scale or soft-cap logits after the head fall back to None). With a head, only the
loss-bearing positions (`batch["positions"]`, see lorakit.engine.batching) go through the vocabulary
projection, which saves most of its time and memory when prompts are masked.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx import nn

from lorakit.engine.batching import PackedMask


def _project(model: nn.Module, hidden: mx.array, head: str) -> mx.array:
    if head == "lm_head":
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def loss_head(model: nn.Module) -> str | None:
    """How to get logits from model.model's hidden states, if that reproduces model(x) exactly."""
    inner = getattr(model, "model", None)
    if inner is None:
        return None
    if "lm_head" in model:
        head = "lm_head"
    elif hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        head = "tied"
    else:
        return None
    x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    was_training = model.training
    model.eval()  # no dropout while comparing
    try:
        expected = model(x)
        got = _project(model, inner(x), head)
        same = expected.shape == got.shape and mx.allclose(expected, got, atol=1e-5, rtol=1e-4).item()
    except Exception:  # noqa: BLE001  (any model whose inner call differs: fall back to the full logits)
        same = False
    finally:
        model.train(was_training)
    return head if same else None


def batch_loss(model: nn.Module, batch: dict[str, Any], head: str | None = None) -> tuple[mx.array, mx.array]:
    """Sum of cross-entropy over loss-bearing targets, and their count (see lorakit.engine.batching.Batch)."""
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    cache = None
    if batch.get("segments") is not None:
        cache = [PackedMask(batch["segments"])] * len(model.layers)
    positions = batch.get("positions")
    if head is None:
        logits = model(inputs, cache=cache)
        if positions is not None:
            logits = logits.reshape(-1, logits.shape[-1])[positions]
    else:
        hidden = model.model(inputs, cache=cache)
        if positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
        logits = _project(model, hidden, head)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * weights
    return ce.sum(), weights.sum()
