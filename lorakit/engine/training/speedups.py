"""Model changes that save memory or time and leave the results the same."""

from __future__ import annotations

import mlx.core as mx
from mlx import nn
from mlx_lm.tuner.lora import LoRALinear


def use_grad_checkpoint(model: nn.Module, on: bool = True) -> None:
    """Recompute each block's activations in the backward pass (the blocks get a subclass; on=False undoes)."""
    set_checkpointed(model.layers, on)


def use_mlp_recompute(model: nn.Module, on: bool = True, blocks: int | None = None) -> None:
    """Recompute each block's MLP in the backward pass: it keeps only its input, which saves about half of a
    LoRA block's activations for one more MLP forward (on=False undoes). blocks: only the first N blocks'
    MLPs (the others keep their activations)."""
    mlps = [block.mlp for block in model.layers]
    count = len(mlps) if blocks is None else min(blocks, len(mlps))
    set_checkpointed(mlps[:count], on)
    set_checkpointed(mlps[count:], False)


_CHECKPOINTED: dict[type, type] = {}


def set_checkpointed(modules: list[nn.Module], on: bool) -> None:
    """Give each module a subclass whose call is recomputed in the backward pass, or take it away."""
    for module in modules:
        base = type(module).__dict__.get("_checkpoint_base")
        if on and base is None:
            module.__class__ = _checkpointed_class(type(module))
        elif not on and base is not None:
            module.__class__ = base


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        call = cls.__call__

        def checkpointed(self, x, *args, _call=call, **kwargs):
            # only the hidden states are differentiated: fused attention has no gradient for a mask
            def inner(params, x):
                self.update(params)
                return _call(self, x, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": checkpointed, "_checkpoint_base": cls})
    return _CHECKPOINTED[cls]


class MixedPrecisionLoRA(LoRALinear):
    """LoRALinear whose branch computes in the input's dtype; the adapter weights stay float32 (Adam's
    small updates need that). mlx-lm's version multiplies bf16/fp16 inputs by float32 weights, which
    makes (and keeps for the backward pass) a float32 copy of every adapted layer's input."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.combine(self.linear(x), self.dropout(x) @ self.lora_a.astype(x.dtype))

    def combine(self, y: mx.array, xa: mx.array) -> mx.array:
        """The base output y plus the adapter's, from xa = (dropped-out) input @ lora_a."""
        return y + (self.scale * (xa @ self.lora_b.astype(xa.dtype))).astype(xa.dtype)


def use_mixed_precision_lora(model: nn.Module) -> None:
    """Switch the LoRA layers to MixedPrecisionLoRA (same parameters, same saved adapters)."""
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = MixedPrecisionLoRA
