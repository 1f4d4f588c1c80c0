"""`lorakit prepare`: raw records -> train/valid/test.jsonl for mlx-lm, with a manifest."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, SeedOpt, opt
from lorakit.settings import PrepareSettings as S

if TYPE_CHECKING:
    from lorakit.engine.prepare import PrepareResult
    from lorakit.engine.reporter import Reporter


EXAMPLE = "lorakit prepare sample_data/support.jsonl --out data/support"


def command(
    ctx: typer.Context,
    inputs: Annotated[list[Path] | None, typer.Argument(help=S.model_fields["inputs"].description,
                                                           metavar="INPUT", show_default=False)] = None,
    out: Annotated[Path | None, opt(S, "out")] = None,
    input_format: Annotated[str | None, opt(S, "input_format")] = None,
    format: Annotated[str | None, opt(S, "format")] = None,
    field_map: Annotated[list[str] | None, opt(S, "field_map")] = None,
    system: Annotated[str | None, opt(S, "system")] = None,
    template: Annotated[str | None, opt(S, "template")] = None,
    model: Annotated[str | None, opt(S, "model")] = None,
    tokenizer: Annotated[str | None, opt(S, "tokenizer")] = None,
    split: Annotated[str | None, opt(S, "split")] = None,
    seed: SeedOpt = None,
    stratify_by: Annotated[str | None, opt(S, "stratify_by")] = None,
    group_by: Annotated[str | None, opt(S, "group_by")] = None,
    on_error: Annotated[str | None, opt(S, "on_error")] = None,
    max_error_rate: Annotated[float | None, opt(S, "max_error_rate")] = None,
    max_chars: Annotated[int | None, opt(S, "max_chars")] = None,
    max_tokens: Annotated[int | None, opt(S, "max_tokens")] = None,
    dedupe: Annotated[bool | None, opt(S, "dedupe")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Validate, deduplicate and split raw JSONL/JSON records into mlx-lm train/valid/test.jsonl."""
    run_command("prepare", ctx.params, _run, _render, _summary, _hint)


def _run(settings: S, reporter: Reporter) -> PrepareResult:
    from lorakit.engine import prepare as engine

    return engine.run(settings, reporter)


def _summary(result: PrepareResult, reporter: Reporter) -> None:
    """Splits with their labels, lengths and formats (stderr)."""
    rows = []
    for name, count in result.counts.items():  # train, valid, test, rejected
        labels = (result.labels or {}).get(name)
        rows.append((name, str(count), ", ".join(f"{k}={v}" for k, v in labels.items()) if labels else ""))
    reporter.table(f"prepared {result.records_read} records -> {result.out}", rows,
                   header=("split", "examples", "labels"))
    lengths = [(unit, *(str(stats[k]) for k in ("min", "mean", "p50", "p95", "max")))
               for unit, stats in result.lengths.items() if stats]
    if lengths:
        reporter.table("lengths", lengths, header=("unit", "min", "mean", "p50", "p95", "max"))
    reporter.log("formats: " + ", ".join(f"{k}={v}" for k, v in result.formats.items()))


def _hint(result: PrepareResult) -> str:
    return f"see the data: lorakit report {shlex.quote(str(result.out))}"


def _render(result: PrepareResult, settings: S) -> None:
    counts = result.counts
    typer.echo(f"{result.out}: train {counts['train']}, valid {counts['valid']}, test {counts['test']}"
               + (f", rejected {counts['rejected']} (see rejected.jsonl)" if counts["rejected"] else ""))
    typer.echo(f"manifest: {result.manifest}")
