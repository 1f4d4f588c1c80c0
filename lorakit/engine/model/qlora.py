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

    def weight(w: mx.array, scales: mx.array, biases: mx.array, after: mx.array) -> mx.array:
        # Tied to the activation it multiplies: MLX would otherwise de-quantize every layer up front
        # (the weights depend on nothing else), holding the whole model in float at once.
        w = mx.depends(w, after)
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(after.dtype)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ weight(w, scales, biases, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        _, w, scales, biases = primals
        # The frozen base gets no gradient; its zero cotangents are never evaluated.
        return (cotangent @ weight(w, scales, biases, cotangent), mx.zeros_like(w),
                mx.zeros_like(scales), mx.zeros_like(biases))

    return matmul


class DequantizedLinear(nn.QuantizedLinear):
    """A QuantizedLinear that multiplies by its de-quantized weight (same parameters, same saved files)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        if "bias" in self:
            y = y + self["bias"]
        return y


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose output projection (a tied head) multiplies by its de-quantized weight."""

    def as_linear(self, x: mx.array) -> mx.array:
        matmul = _dequantized_matmul(self.group_size, self.bits)
        return matmul(x, self["weight"], self["scales"], self["biases"])


_FAST = {nn.QuantizedLinear: DequantizedLinear, nn.QuantizedEmbedding: DequantizedEmbedding}


def use_dequantized_matmuls(model: nn.Module) -> int:
    """Switch every affine-quantized linear layer (and tied head) of `model` to the fast path; count them."""
    switched = 0
    for _, module in model.named_modules():
        fast = _FAST.get(type(module))
        if fast is not None and getattr(module, "mode", "affine") == "affine" and "biases" in module:
            module.__class__ = fast
            switched += 1
    return switched


def helps_here() -> bool:
    """Whether the fast path measures faster on this device: the CPU and CUDA backends, not Metal."""
    return mx.default_device() == mx.cpu or mx.cuda.is_available()
