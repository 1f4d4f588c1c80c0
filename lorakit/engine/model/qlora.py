"""QLoRA fast path: a frozen quantized weight is de-quantized into a transient float buffer right before its
matmul, in the forward pass and again in the backward pass (as bitsandbytes does for training).

The weights stay quantized in memory; the backward pass re-dequantizes a weight instead of keeping its float
copy. Where MLX's quantized matmul is slow for training-sized inputs (CPU, CUDA), a float matmul on the
de-quantized weight is several times faster. Metal keeps MLX's own kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import mlx.core as mx
from mlx import nn


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """mx.dequantize's values; on the CPU, 4- and 8-bit weights go through unpack_dequantize."""
    if bits in (4, 8) and mx.default_device() == mx.cpu:
        return unpack_dequantize(w, scales, biases, group_size, bits)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def unpack_dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """De-quantize 4- or 8-bit weights with element-wise ops, which a compiled step fuses into one pass (MLX's
    CPU kernel is 2x slower and makes temporaries 4x the size of its output)."""
    packed = w.view(mx.uint8)  # little-endian: byte k holds elements 2k (low nibble) and 2k+1
    q = mx.stack([packed & 15, packed >> 4], axis=-1) if bits == 4 else packed
    rows = w.shape[:-1]
    q = q.reshape(*rows, -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(*rows, -1)


def _float_weight(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
                  after: mx.array) -> mx.array:
    # Tied to the activation it multiplies: MLX would otherwise de-quantize every layer up front
    # (the weights depend on nothing else), holding the whole model in float at once.
    w = mx.depends(w, after)
    return mx.stop_gradient(dequantize(w, scales, biases, group_size, bits).astype(after.dtype))


@cache
def _dequantized_matmul(group_size: int, bits: int):
    """x @ dequantize(w).T whose gradient with respect to x re-dequantizes w (nothing float is kept)."""

    @mx.custom_function
    def matmul(x, w, scales, biases):
        return x @ _float_weight(w, scales, biases, group_size, bits, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        _, w, scales, biases = primals
        # The frozen base gets no gradient; its zero cotangents are never evaluated.
        return (cotangent @ _float_weight(w, scales, biases, group_size, bits, cotangent), mx.zeros_like(w),
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
    """Switch every affine-quantized linear layer (and tied head) of `model` to the fast path; count them.

    On the CPU the model also computes in float32: MLX's CPU matmuls are fast only in float32 (BLAS), and
    half-precision scales would make every de-quantized weight and activation half precision. Widening the
    scales, biases and norms is exact; the packed weights stay as they are.
    """
    switched = 0
    for _, module in model.named_modules():
        fast = _FAST.get(type(module))
        if fast is not None and getattr(module, "mode", "affine") == "affine" and "biases" in module:
            module.__class__ = fast
            switched += 1
    if switched and mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    return switched


def head_projection(head: nn.Module, after: mx.array) -> Callable[[mx.array], mx.array] | None:
    """For a fast-path vocabulary head: x -> logits with its weight de-quantized once, where the loss's
    chunks would each de-quantize it twice (forward and gradient). None for any other head."""
    if not isinstance(head, (DequantizedLinear, DequantizedEmbedding)):
        return None
    weight = _float_weight(head["weight"], head["scales"], head["biases"], head.group_size, head.bits, after)
    bias = head["bias"] if "bias" in head else None
    return lambda x: x @ weight.T if bias is None else x @ weight.T + bias


def helps_here() -> bool:
    """Whether the fast path measures faster on this device: the CPU and CUDA backends, not Metal."""
    return mx.default_device() == mx.cpu or mx.cuda.is_available()
