"""loss.svg: train and validation loss by step with the best step marked. The chart is drawn by
lorakit.engine.report.charts, which draws the curves of `lorakit report` too."""

from __future__ import annotations

from pathlib import Path

from lorakit.engine.report.charts import loss_chart
from lorakit.io import write_text


def write_loss_curve(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]],
                     best_step: int | None, model: str | None = None) -> None:
    write_text(path, loss_chart(train, val, best_step, model))
