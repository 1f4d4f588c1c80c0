"""QLoRA fast path: a frozen quantized weight is de-quantized into a transient float buffer right before its
matmul, in the forward pass and again in the backward pass (as bitsandbytes does for training).

The weights stay quantized in memory; only one layer's float copy exists at a time, and the backward pass
recomputes it instead of keeping it. Where MLX's quantized matmul is slow for training-sized inputs (CPU,
CUDA), a float matmul on the de-quantized weight is several times faster. Metal keeps MLX's own kernels.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx import nn


@cache
def _dequantized_matmul(group_size: int, bits: int):
    """x @ dequantize(w).T whose gradient with respect to x re-dequantizes w (nothing float is kept)."""

    def weight(w: mx.array, scales: mx.array, biases: mx.array, dtype: mx.Dtype) -> mx.array:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases, x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        _, w, scales, biases = primals
        # The frozen base gets no gradient; its zero cotangents are never evaluated.
        return (cotangent @ weight(w, scales, biases, cotangent.dtype), mx.zeros_like(w),
                mx.zeros_like(scales), mx.zeros_like(biases))

    return matmul


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its de-quantized weight (same parameters, same saved files)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        if "bias" in self:
            y = y + self["bias"]
        return y


def use_dequantized_matmuls(model: nn.Module) -> int:
    """Switch every affine-quantized linear layer of `model` to DequantizedLinear; return how many."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and getattr(module, "mode", "affine") == "affine" \
                and "biases" in module:
            module.__class__ = DequantizedLinear
            switched += 1
    return switched


def helps_here() -> bool:
    """Whether the fast path measures faster on this device: the CPU and CUDA backends, not Metal."""
    return mx.default_device() == mx.cpu or mx.cuda.is_available()
