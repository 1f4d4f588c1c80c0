"""The compiled training steps.

One optimizer step = `grad_accumulation_steps` micro-batches. Each micro-batch adds the gradient of its
*summed* loss (over tokens, or over pairs for DPO/ORPO); the update divides by the total count, so batch 4
and 2 x 2 accumulation make the same update (and the data-parallel all-sum slots in at `_reduce`). The loss
(an objective's `loss(model, batch) -> (sum, count, stats)`) is an argument, so tests can swap it; `stats`
(the objective's metric sums, e.g. DPO reward accuracy) come back with the loss.

The update also returns how many trainable weight tensors hold a NaN or inf afterwards: one fused reduction
inside the compiled graph, so a step whose update blew up is never saved or reported.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from lorakit.engine.model import distributed as dist


class Steps(NamedTuple):
    """The compiled step functions; `state` is what they read and write (evaluate it with their outputs)."""

    full: Callable  # (batch) -> (loss sum, count, stats, grad norm, non-finite weights): forward, backward, update
    micro: Callable  # (batch, grad sum or None) -> (loss sum, count, stats, grad sum): one accumulated micro-batch
    apply: Callable  # (grad sum, tokens) -> (grad norm, non-finite weights): the update after the last micro
    state: list


def compile_steps(model: nn.Module, optimizer: optim.Optimizer, loss: Callable,
                  max_grad_norm: float | None) -> Steps:
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    def update(grad, ntoks):
        grad, ntoks = _reduce(grad, ntoks)
        grad = tree_map(lambda g: g / ntoks, grad)
        if max_grad_norm:
            grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
        else:
            norm = _global_norm(grad)
        optimizer.update(model, grad)
        return norm, _nonfinite_tensors(model.trainable_parameters())

    @partial(mx.compile, inputs=state, outputs=state)
    def full(batch):
        (loss_sum, ntoks, stats), grad = loss_and_grad(model, batch)
        return loss_sum, ntoks, stats, *update(grad, ntoks)

    @partial(mx.compile, inputs=state, outputs=state)
    def micro(batch, grad_sum):
        (loss_sum, ntoks, stats), grad = loss_and_grad(model, batch)
        if grad_sum is not None:
            grad = tree_map(mx.add, grad, grad_sum)
        return loss_sum, ntoks, stats, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grad, ntoks):
        return update(grad, ntoks)

    return Steps(full=full, micro=micro, apply=apply, state=state)


def _nonfinite_tensors(params: Any) -> mx.array:
    """How many of the tensors hold a NaN or inf (a count of tensors: a count of values could overflow)."""
    flags = (mx.any(mx.logical_not(mx.isfinite(p))).astype(mx.int32) for _, p in tree_flatten(params))
    return sum(flags, mx.array(0, mx.int32))


def _global_norm(grad: Any) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grad)))


def _reduce(grad: Any, ntoks: mx.array) -> tuple[Any, mx.array]:
    """Combine gradient sums across data-parallel ranks: mean gradient / mean token count = sum / sum."""
    w = dist.world()
    if not w.is_distributed:
        return grad, ntoks
    return w.average_gradients(grad), w.sum(ntoks) / w.size
