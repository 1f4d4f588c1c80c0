"""`lorakit report`: one self-contained HTML page about prepared data, training runs and their evals."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt
from lorakit.settings import ReportSettings as S

if TYPE_CHECKING:
    from lorakit.engine.report import ReportResult
    from lorakit.engine.reporter import Reporter

EXAMPLE = "lorakit report runs/support --out runs/support/report.html"


def command(
    ctx: typer.Context,
    paths: Annotated[list[Path] | None, typer.Argument(help=S.model_fields["paths"].description,
                                                          metavar="PATH", show_default=False)] = None,
    out: Annotated[Path | None, opt(S, "out")] = None,
    examples: Annotated[int | None, opt(S, "examples")] = None,
    samples: Annotated[int | None, opt(S, "samples")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Write one HTML page (no server, no network) showing data, loss curves, evals and generations."""
    run_command("report", ctx.params, _run, _render)


def _run(settings: S, reporter: Reporter) -> ReportResult:
    from lorakit.engine import report as engine

    return engine.run(settings, reporter)


def _render(result: ReportResult, settings: S) -> None:
    typer.echo(f"wrote {result.out} ({', '.join(result.sections)})")
    typer.echo(f"open it: {Path(result.out).resolve().as_uri()}")
