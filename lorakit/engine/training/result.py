"""What a run leaves in --adapter-path besides checkpoints: the file names, and TrainResult (report.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

METRICS = "metrics.jsonl"
REPORT = "report.json"
CURVE = "loss.svg"
SETTINGS_FILE = "lorakit.yaml"


@dataclass
class RunSizes:
    """Examples and parameters of a run, as its result reports them."""

    train_examples: int
    valid_examples: int
    truncated_examples: int
    trainable_parameters: int
    total_parameters: int


@dataclass
class TrainResult:
    adapter_path: str
    adapter_file: str
    best_path: str | None
    steps: int
    epochs: float
    best_step: int | None
    best_val_loss: float | None
    initial_val_loss: float | None
    final_val_loss: float | None
    final_train_loss: float | None
    trained_tokens: int
    tokens_per_second: float
    peak_memory_gb: float
    wall_time_s: float
    stopped_early: bool
    resumed_from: str | None
    train_examples: int
    valid_examples: int
    truncated_examples: int
    trainable_parameters: int
    total_parameters: int
    metrics_file: str
    loss_curve: str
    report_file: str
    world_size: int = 1  # processes under mlx.launch (data-parallel ranks)
    warmup_s: float = 0.0  # in steps that compiled a new batch shape (this process's part of the run)
    compiled_shapes: int = 0
    steady_tokens_per_second: float | None = None  # the steps that compiled nothing
    layout: str = ""  # the flags of the batch layout (autofit's choice or the user's)

    def __post_init__(self) -> None:
        # report.json and --json stay strict JSON: a NaN or inf is reported as null
        for f in fields(self):
            setattr(self, f.name, finite_or_none(getattr(self, f.name)))

    def summary_rows(self) -> list[tuple[str, str]]:
        """The "training summary" table."""
        return [
            ("steps", f"{self.steps} ({self.epochs:g} epochs)"
                      f"{' - stopped early' if self.stopped_early else ''}"),
            ("val loss", (f"{_fmt(self.initial_val_loss)} -> {_fmt(self.final_val_loss)} "
                          f"(best {_fmt(self.best_val_loss)} at step {self.best_step})")),
            ("train loss", _fmt(self.final_train_loss)),
            ("tokens", f"{self.trained_tokens:,} trained, {self.tokens_per_second:,.1f}/s overall"),
            ("speed", f"{_speed(self.steady_tokens_per_second)} after {self.warmup_s:.1f} s warm-up "
                      f"({self.compiled_shapes} shapes compiled)"),
            ("layout", self.layout),
            ("peak memory", f"{self.peak_memory_gb:.3f} GB"),
            ("wall time", f"{self.wall_time_s:.1f} s"),
        ]


def _speed(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} tokens/s"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN / inf float (also inside dicts and lists) replaced by None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
