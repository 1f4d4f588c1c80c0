"""The progress line fits the terminal: at 80 columns the bar, step/total, loss and ETA stay visible and the
less important fields go first; --quiet shows none."""

import io
import re

import pytest
from rich.console import Console

from lorakit.cli.reporting import FittedProgress, RichReporter

FIELDS = {"epoch": 0.225, "loss": 3.659, "val_loss": 3.7123, "lr": 1e-4, "tok_s": 2697.3, "mem_gb": 0.531}


def render(width: int, total: int | None = 150, steps: int = 34, fields=FIELDS) -> str:
    clock = [0.0]
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    progress = FittedProgress(console=console, get_time=lambda: clock[0])
    task = progress.add_task("train", total=total, values={})
    for _ in range(steps):
        clock[0] += 1.5
        progress.update(task, advance=1, values=dict(fields))
    console.print(*progress.get_renderables())
    return console.file.getvalue()


def test_80_columns_keep_bar_step_loss_and_eta():
    lines = render(80).splitlines()
    assert len(lines) == 1 and len(lines[0]) < 80
    line = lines[0]
    assert line.startswith("train ━")
    assert "34/150" in line and "loss=3.659" in line and "ETA 0:02:54" in line
    assert "tok_s" not in line and "mem_gb" not in line  # the least important fields went first
    assert line.index("34/150") < line.index("loss=") < line.index("ETA")


def test_wide_terminal_shows_every_field():
    line = render(160).splitlines()[0]
    for text in ("34/150", "23%", "loss=3.659", "val_loss=3.712", "epoch=0.225", "lr=0.0001", "tok_s=2697",
                 "mem_gb=0.531", "0:00:51", "ETA 0:02:54"):
        assert text in line
    assert "━" * 40 in line


@pytest.mark.parametrize("width", [30, 50, 80, 100, 120])
def test_never_wider_than_the_terminal(width):
    line = render(width).splitlines()[0]
    assert len(line) < width and "34/150" in line and "ETA" in line and "━" in line


def test_fields_drop_in_order_of_importance():
    order = ["loss", "val_loss", "epoch", "lr", "tok_s", "mem_gb"]
    for width in range(50, 170, 5):
        line = render(width)
        shown = [k for k in order if re.search(rf"(?<![a-z_]){k}=", line)]
        assert shown == order[:len(shown)], width  # always the most important ones


def test_unknown_total_shows_the_elapsed_time():
    line = render(80, total=None, fields={"loss": 2.5}).splitlines()[0]
    assert "34 " in line and "loss=2.5" in line and "0:00:51" in line and "ETA" not in line


def test_quiet_shows_no_progress(capsys):
    reporter = RichReporter(quiet=True)
    reporter.start("train", total=10)
    reporter.advance(1, loss=1.0)
    reporter.close()
    captured = capsys.readouterr()
    assert reporter.progress is None and captured.err == "" and captured.out == ""
