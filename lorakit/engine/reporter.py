"""How the engine tells the outside world what it is doing, without printing (like mlx-lm's TrainingCallback)."""

from __future__ import annotations

from typing import Any


class Reporter:
    """No-op base. The CLI subclasses it (rich on stderr); tests can record calls."""

    def log(self, message: str) -> None:
        """An informational line (shown unless --quiet)."""

    def warn(self, message: str) -> None:
        """Something the user should know about (always shown)."""

    def start(self, task: str, total: int | None = None, **fields: Any) -> None:
        """Begin a progress bar for `task` with `total` units (None: unknown)."""

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Move the current progress bar by n and update its displayed fields."""

    def phase(self, text: str | None) -> None:
        """What the current progress bar is busy with beyond its units (e.g. "compiling"); None: done."""

    def finish(self) -> None:
        """End the current progress bar."""

    def table(self, title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
        """A small summary table (stderr)."""

    def on_train_report(self, info: dict[str, Any]) -> None:
        """A training report: iteration, train_loss, learning_rate, tokens_per_second, ..."""

    def on_eval(self, info: dict[str, Any]) -> None:
        """A validation result: iteration, val_loss, ..."""

    def on_save(self, path: str, step: int) -> None:
        """A checkpoint or artifact was written."""

    def on_token(self, text: str) -> None:
        """A streamed piece of generated text (generate, single prompt)."""


class RecordingReporter(Reporter):
    """Keeps every call; handy in tests."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def log(self, message: str) -> None:
        self.events.append(("log", message))

    def warn(self, message: str) -> None:
        self.events.append(("warn", message))

    def on_train_report(self, info: dict[str, Any]) -> None:
        self.events.append(("train", dict(info)))

    def on_eval(self, info: dict[str, Any]) -> None:
        self.events.append(("eval", dict(info)))

    def on_save(self, path: str, step: int) -> None:
        self.events.append(("save", (path, step)))

    def on_token(self, text: str) -> None:
        self.events.append(("token", text))

    def phase(self, text: str | None) -> None:
        self.events.append(("phase", text))
