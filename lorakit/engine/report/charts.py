"""The loss chart as `loss.svg` and the report draw it: a run's train and validation loss, best step marked."""

from __future__ import annotations

from pathlib import Path

from lorakit.engine.report.svg import COLORS, Mark, Series, line_chart


def short_model_name(model: str) -> str:
    """A model path or hub id as a title shows it: the last part, without a .gguf suffix."""
    name = Path(str(model).rstrip("/")).name or str(model)
    return name.removesuffix(".gguf")


def loss_series(train: list[tuple[int, float]], val: list[tuple[int, float]], best_step: int | None,
                prefix: str = "", color: int = 0) -> tuple[list[Series], list[Mark]]:
    """One run's lines (train solid, validation dashed) and its best-step mark; `prefix` names the run
    when several share a chart, `color` picks its color (one run: blue and red)."""
    train_color, val_color = (COLORS[0], COLORS[1]) if not prefix else (COLORS[color % len(COLORS)],) * 2
    series = [Series(f"{prefix}train", list(train), train_color, dots=len(train) <= 60),
              Series(f"{prefix}validation", list(val), val_color, dashed=True)]
    best = [(s, v) for s, v in val if s == best_step]
    marks = [Mark(best[-1][0], best[-1][1], f"best {best[-1][1]:.3f} @ step {best[-1][0]}")] if best else []
    return series, marks


def loss_chart(train: list[tuple[int, float]], val: list[tuple[int, float]], best_step: int | None,
               model: str | None = None, width: int = 640) -> str:
    """One run's loss chart, titled with the model's short name."""
    series, marks = loss_series(train, val, best_step)
    title = f"loss: {short_model_name(model)}" if model else "loss"
    return line_chart(series, title=title, x_label="step", y_label="loss", marks=marks, width=width)
