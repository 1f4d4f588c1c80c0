"""Masked, token-weighted cross-entropy: `batch_loss(model, batch, head) -> (loss_sum, n_tokens)`.

The sum (not the mean) comes back so micro-batches and data-parallel shards add up exactly; the caller
divides by the total token count.

`head` says how to project hidden states onto the vocabulary without calling the full model:
"lm_head" (model.lm_head), "tied" (model.model.embed_tokens.as_linear), or None (call model(...) and take
its logits). `loss_head(model)` picks it once and checks numerically that head(model.model(x)) really is
model(x) (models that scale or soft-cap logits after the head fall back to None). With a head, only the
loss-bearing positions (`batch["positions"]`, see lorakit.engine.data.batching) go through the vocabulary
projection, which saves most of its time and memory when prompts are masked.

With a head the projection also runs in chunks of CHUNK_ELEMENTS logits, so B x T x V float32 logits never
exist at once. In training (frozen head) each chunk computes its loss and, right away, the gradient with
respect to its hidden states (softmax - one-hot, projected back), and a custom vjp hands that gradient
on: no logits are kept for the backward pass and none are recomputed.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from lorakit.engine.data.batching import PackedMask
from lorakit.engine.model.qlora import head_projection

CHUNK_ELEMENTS = 2**26  # logits per vocabulary-projection chunk (256 MB in float32)


def _project(model: nn.Module, hidden: mx.array, head: str) -> mx.array:
    if head == "lm_head":
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def _head_module(model: nn.Module, head: str) -> nn.Module:
    return model.lm_head if head == "lm_head" else model.model.embed_tokens


def _token_losses(logits: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (lse - picked)[:, 0] * weights, lse


def _losses_and_probs(logits: mx.array, targets: mx.array, weights: mx.array, one_exp: bool
                      ) -> tuple[mx.array, mx.array]:
    """Weighted cross-entropy per row and the softmax. one_exp: exponentiate each logit once (MLX's CPU exp
    costs ~10 ns per element); otherwise the fused logsumexp plus a second exp, which reads less memory."""
    if not one_exp:
        loss, lse = _token_losses(logits, targets, weights)
        return loss, mx.exp(logits - lse)
    shifted = logits - mx.max(logits, axis=-1, keepdims=True)
    e = mx.exp(shifted)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(shifted, targets[:, None], axis=-1)
    return (mx.log(total) - picked)[:, 0] * weights, e / total


def chunked_cross_entropy(project, hidden: mx.array, targets: mx.array, weights: mx.array, vocab_size: int,
                          fused_grad: bool) -> mx.array:
    """Sum of weighted cross-entropy of project(hidden) (N x D hidden, N targets), chunk by chunk.

    fused_grad: compute d(loss)/d(hidden) inside each chunk (valid only when `project` has no trainable
    weights); otherwise autodiff differentiates the chunks as usual.
    """
    n = hidden.shape[0]
    size = max(64, CHUNK_ELEMENTS // vocab_size)
    chunks = [(s, min(s + size, n)) for s in range(0, n, size)]
    if not fused_grad:
        total = mx.array(0.0)
        for a, b in chunks:
            loss, _ = _token_losses(project(hidden[a:b]).astype(mx.float32), targets[a:b], weights[a:b])
            total = total + loss.sum()
        return total

    one_exp = mx.default_device() == mx.cpu

    @mx.custom_function
    def loss_and_grad(h):
        parts = []
        for a, b in chunks:
            # each chunk starts after the previous one is done: MLX would otherwise run the chunks side by
            # side (it evaluates independent work breadth-first), holding every chunk's logits at once
            hc = mx.depends(h[a:b], parts[-1]) if parts else h[a:b]
            t, w = targets[a:b], weights[a:b]
            logits = project(hc).astype(mx.float32)
            loss, probs = _losses_and_probs(logits, t, w, one_exp)
            dlogits = (probs - (mx.arange(vocab_size) == t[:, None])) * w[:, None]
            dh = mx.vjp(project, [hc], [dlogits.astype(hc.dtype)])[1][0]
            # one array per chunk holding its gradient and losses
            parts.append(mx.concatenate([dh.astype(mx.float32), loss[:, None]], axis=1))
        out = mx.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[:, -1].sum(), out[:, :-1].astype(h.dtype)

    @loss_and_grad.vjp
    def _(primals, cotangents, outputs):
        return (outputs[1] * cotangents[0].astype(outputs[1].dtype),)

    return loss_and_grad(hidden)[0]


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


def _packed_cache(model: nn.Module, batch: dict[str, Any]) -> list[PackedMask] | None:
    """Per-layer stand-in caches that keep packed examples from attending to each other (None: not packed)."""
    if batch.get("segments") is None:
        return None
    return [PackedMask(batch["segments"])] * len(model.layers)


def token_losses(model: nn.Module, batch: dict[str, Any], head: str | None = None
                 ) -> tuple[mx.array, mx.array, mx.array]:
    """Weighted cross-entropy of every target, the weights, and each target's flat position (row * width + t).

    Unchunked and gradient-agnostic: what evaluation needs per example, and batch_loss's full-logits path.
    """
    inputs, targets, weights = batch["inputs"], batch["targets"].reshape(-1), batch["weights"].reshape(-1)
    cache = _packed_cache(model, batch)
    positions = batch.get("positions")
    if positions is None:
        positions = mx.arange(inputs.size)
    if head is None:
        logits = model(inputs, cache=cache)
        logits = logits.reshape(-1, logits.shape[-1])[positions]
    else:
        hidden = model.model(inputs, cache=cache)
        logits = _project(model, hidden.reshape(-1, hidden.shape[-1])[positions], head)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * weights
    return ce, weights, positions


def batch_loss(model: nn.Module, batch: dict[str, Any], head: str | None = None) -> tuple[mx.array, mx.array]:
    """Sum of cross-entropy over loss-bearing targets, and their count (see lorakit.engine.data.batching.Batch)."""
    if head is None:
        ce, weights, _ = token_losses(model, batch)
        return ce.sum(), weights.sum()
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    cache = _packed_cache(model, batch)
    positions = batch.get("positions")
    hidden = model.model(inputs, cache=cache)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if positions is not None:
        hidden = hidden[positions]
    module = _head_module(model, head)
    vocab_size = module.weight.shape[0]
    frozen = not tree_flatten(module.trainable_parameters())
    project = head_projection(module, hidden) or partial(_project, model, head=head)
    loss = chunked_cross_entropy(project, hidden, targets.reshape(-1), weights.reshape(-1), vocab_size,
                                 fused_grad=model.training and frozen)
    return loss, weights.sum()
