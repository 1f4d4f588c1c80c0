"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.optimizers as optim

from lorakit.settings import TrainSettings


def lr_schedule(settings: TrainSettings, total_steps: int):
    """Learning rate for the update made at optimizer step `step` (0-based): warmup, then the schedule."""
    peak, floor = settings.learning_rate, settings.learning_rate * settings.min_lr_ratio
    warmup = settings.warmup if settings.warmup >= 1 else settings.warmup * total_steps
    warmup = min(round(warmup), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)

    def lr(step: mx.array) -> mx.array:
        n = step.astype(mx.float32) + 1  # the update being made, 1-based
        warm = mx.minimum(n / warmup, 1.0) if warmup else mx.array(1.0)
        progress = mx.clip((n - warmup) / decay_steps, 0.0, 1.0)
        if settings.lr_schedule == "cosine":
            value = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        elif settings.lr_schedule == "linear":
            value = peak - (peak - floor) * progress
        else:
            value = mx.array(peak)
        return warm * value

    return lr


def make_optimizer(settings: TrainSettings, total_steps: int) -> optim.Optimizer:
    lr = lr_schedule(settings, total_steps)
    if settings.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if settings.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=settings.weight_decay)
    return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)
