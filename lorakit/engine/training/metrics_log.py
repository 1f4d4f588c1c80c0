"""metrics.jsonl (one line per train report or evaluation) and the points of the loss curve."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lorakit.engine.training.result import finite_or_none


class MetricsLog:
    """Appends rows to metrics.jsonl and keeps the (step, loss) points for the loss curve.

    On resume, rows after the checkpoint's step are dropped: the resumed run writes them again. A line that
    cannot be read (a run killed while writing it) is dropped with a warning. `path` may change while the run
    goes on (an --overwrite run moves out of its staging directory).
    """

    def __init__(self, path: Path, resume_step: int | None, write: bool = True,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.write = write
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        kept = self._read(resume_step, warn) if resume_step is not None and path.exists() else []
        if write:
            path.write_text("".join(line + "\n" for line in kept))

    def _read(self, resume_step: int, warn: Callable[[str], None] | None) -> list[str]:
        """The lines up to `resume_step` (remembered for the loss curve)."""
        kept, unreadable = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["iteration"]
            except (ValueError, TypeError, KeyError):
                unreadable += 1
                continue
            if isinstance(step, int) and step <= resume_step:
                kept.append(line)
                self._remember(row)
        if unreadable and warn is not None:
            warn(f"{self.path}: dropped {unreadable} unreadable line(s) (cut off when a run was killed?)")
        return kept

    def _remember(self, row: dict) -> None:
        if row.get("train_loss") is not None:
            self.train.append((row["iteration"], row["train_loss"]))
        if row.get("val_loss") is not None:
            self.val.append((row["iteration"], row["val_loss"]))

    def add(self, row: dict) -> None:
        row = finite_or_none(row)  # strict JSON lines: a NaN is written as null
        self._remember(row)
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
