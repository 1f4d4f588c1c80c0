"""Compile warm-up: the first step at each batch shape compiles the step function, and costs far more than
the steps after it. Those steps are counted apart, so the report gives the steady speed and the warm-up."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class Warmup:
    seen: set = field(default_factory=set)
    seconds: float = 0.0  # in steps that compiled a new shape
    steady_seconds: float = 0.0
    steady_tokens: int = 0

    def is_new(self, arrays: dict[str, mx.array | None]) -> bool:
        """Whether this batch's shapes are new to the compiled step (and so it compiles first)."""
        key = tuple((name, tuple(a.shape)) for name, a in sorted(arrays.items()) if a is not None)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def add(self, seconds: float, tokens: int, compiled: bool) -> None:
        if compiled:
            self.seconds += seconds
        else:
            self.steady_seconds += seconds
            self.steady_tokens += tokens

    @property
    def steady_tokens_per_second(self) -> float | None:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds else None
