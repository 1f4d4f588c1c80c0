"""The CLI's reporter: rich progress, logs and tables on stderr (stdout stays for results)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from lorakit.engine.reporter import Reporter

_err: Console | None = None


def err_console() -> Console:
    global _err
    if _err is None:
        _err = Console(stderr=True)
    return _err


def out_console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = err_console()
        self.progress: Progress | None = None
        self.task_id: Any = None

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    def start(self, task: str, total: int | None = None, **fields: Any) -> None:
        self.finish()
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(task, total=total, info=self._info(fields))

    @staticmethod
    def _info(fields: dict[str, Any]) -> str:
        return "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None)

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self.progress is not None:
            update: dict[str, Any] = {"advance": n}
            if fields:
                update["info"] = self._info(fields)
            self.progress.update(self.task_id, **update)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.finish()

    def table(self, title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None) -> None:
        if self.quiet:
            return
        t = Table(title=title, show_header=header is not None, title_justify="left")
        for name in header or ("",) * (len(rows[0]) if rows else 1):
            t.add_column(name)
        for row in rows:
            t.add_row(*[_fmt(c) for c in row])
        self.console.print(t)

    def on_train_report(self, info: dict[str, Any]) -> None:
        keys = ("iteration", "epoch", "train_loss", "learning_rate", "tokens_per_second", "peak_memory")
        line = "  ".join(f"{k}={_fmt(info[k])}" for k in keys if info.get(k) is not None)
        if self.progress is not None:
            self.progress.console.print(line, highlight=False) if not self.quiet else None
        else:
            self.log(line)

    def on_eval(self, info: dict[str, Any]) -> None:
        line = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items() if v is not None)
        self.log(f"[cyan]eval[/] {line}")

    def on_save(self, path: str, step: int) -> None:
        self.log(f"saved {path}" + (f" (step {step})" if step else ""))

    def on_token(self, text: str) -> None:
        # Generated text is the result, so it goes to stdout (even with --quiet), flushed as it comes.
        sys.stdout.write(text)
        sys.stdout.flush()
