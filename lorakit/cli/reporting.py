"""The CLI's reporter: rich progress, logs and tables on stderr (stdout stays for results)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, Task
from rich.table import Table
from rich.text import Text

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


# The progress line's fields, most important first: a line too wide for the terminal drops them from the end
# (then the percentage and the elapsed time); the bar, step/total and the ETA always stay.
FIELD_ORDER = ("loss", "val_loss", "acc", "epoch", "lr", "tok_s", "mem_gb")  # acc: DPO/ORPO reward accuracy
BAR_MIN, BAR_MAX = 10, 40


def _values(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _optional_parts(task: Task) -> list[tuple[int, str]]:
    """(position in the line, text) of what the line may drop, most important first."""
    values = task.fields.get("values") or {}
    known = [k for k in FIELD_ORDER if k in values] + [k for k in values if k not in FIELD_ORDER]
    parts = [(2 + FIELD_ORDER.index(k) if k in FIELD_ORDER else 50, f"{k}={_fmt(values[k])}") for k in known]
    if task.total:
        parts.append((1, f"{task.percentage:.0f}%"))
        parts.append((90, _clock(task.elapsed)))
    return parts


def fit_line(task: Task, width: int) -> Text:
    """The task's progress on one line of at most `width` - 1 columns: description, bar, step/total, the most
    important fields that fit, and the ETA (the elapsed time when the total is unknown)."""
    budget = width - 1  # the last column makes some terminals wrap
    count = f"{int(task.completed)}/{int(task.total)}" if task.total else f"{int(task.completed)}"
    clock = f"ETA {_clock(task.time_remaining)}" if task.total else _clock(task.elapsed)
    desc = task.description
    used = len(desc) + 1 + BAR_MIN + 1 + len(count) + 1 + len(clock)
    if used > budget:
        desc, used = "", used - len(desc) - 1
    chosen = [(0, count), (99, clock)]
    for position, text in _optional_parts(task):
        if used + 1 + len(text) > budget:
            break
        chosen.append((position, text))
        used += 1 + len(text)
    bar = max(min(BAR_MAX, BAR_MIN + budget - used), 1)
    done = min(int(bar * task.completed / task.total), bar) if task.total else 0
    line = Text(no_wrap=True, overflow="ellipsis")
    if desc:
        line.append(desc + " ", style="bold")
    line.append("\u2501" * done, style="bar.finished" if task.finished else "bar.complete")
    line.append("\u2501" * (bar - done), style="bar.back")
    line.append(" " + " ".join(text for _, text in sorted(chosen, key=lambda item: item[0])))
    return line


class FittedProgress(Progress):
    """rich's Progress with one line per task that fits the console's width (fit_line)."""

    def get_renderables(self) -> Any:
        table = Table.grid()
        for task in self.tasks:
            table.add_row(fit_line(task, self.console.width))
        yield table


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = err_console()
        self.progress: Progress | None = None
        self.task_id: Any = None
        self.task = ""

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)  # file names may hold [brackets]

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def start(self, task: str, total: int | None = None, **fields: Any) -> None:
        self.finish()
        if self.quiet:
            return
        self.progress = FittedProgress(console=self.console, transient=False)
        self.progress.start()
        self.task_id = self.progress.add_task(task, total=total, values=_values(fields))
        self.task = task

    def phase(self, text: str | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, description=f"{self.task} ({text})" if text else self.task)

    def advance(self, n: int = 1, **fields: Any) -> None:
        if self.progress is not None:
            update: dict[str, Any] = {"advance": n}
            if fields:
                update["values"] = _values(fields)
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
        keys = ("iteration", "epoch", "train_loss", "reward_accuracy", "reward_margin", "learning_rate",
                "tokens_per_second", "peak_memory")
        line = "  ".join(f"{k}={_fmt(info[k])}" for k in keys if info.get(k) is not None)
        if self.progress is not None:
            self.progress.console.print(line, highlight=False) if not self.quiet else None
        else:
            self.log(line)

    def on_eval(self, info: dict[str, Any]) -> None:
        line = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items() if v is not None)
        if not self.quiet:
            self.console.print(f"[cyan]eval[/] {escape(line)}", highlight=False)

    def on_save(self, path: str, step: int) -> None:
        self.log(f"saved {path}" + (f" (step {step})" if step else ""))

    def on_token(self, text: str) -> None:
        # Generated text is the result, so it goes to stdout (even with --quiet), flushed as it comes.
        sys.stdout.write(text)
        sys.stdout.flush()
