"""Median time and peak memory of a repeated MLX computation (the kernel benchmarks share it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np


def time_and_peak(run: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(median seconds, peak GB above what was allocated before, the last result) of `run`, after one
    untimed call (compilation, kernel caches)."""
    out = run()
    mx.eval(out)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        mx.eval(out)
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), (mx.get_peak_memory() - base) / 1e9, out
