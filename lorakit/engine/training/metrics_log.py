"""metrics.jsonl (one line per train report or evaluation) and the points of the loss curve."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends rows to metrics.jsonl and keeps the (step, loss) points for the loss curve.

    On resume, rows after the checkpoint's step are dropped: the resumed run writes them again.
    """

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        self.path = path
        self.write = write
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["iteration"] <= resume_step:
                    kept.append(line)
                    self._remember(row)
        if write:
            path.write_text("".join(line + "\n" for line in kept))

    def _remember(self, row: dict) -> None:
        if row.get("train_loss") is not None:
            self.train.append((row["iteration"], row["train_loss"]))
        if row.get("val_loss") is not None:
            self.val.append((row["iteration"], row["val_loss"]))

    def add(self, row: dict) -> None:
        self._remember(row)
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
