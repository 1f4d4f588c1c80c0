"""`lorakit prepare`: raw records -> train/valid/test.jsonl for mlx-lm, with a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt, run_command
from lorakit.settings import PrepareSettings as S


def command(
    inputs: Annotated[list[Path] | None, typer.Argument(help=S.model_fields["inputs"].description,
                                                           metavar="INPUT", show_default=False)] = None,
    out: Annotated[Path | None, opt(S, "out", "--out", "-o")] = None,
    input_format: Annotated[str | None, opt(S, "input_format")] = None,
    format: Annotated[str | None, opt(S, "format")] = None,
    field_map: Annotated[list[str] | None, opt(S, "field_map")] = None,
    system: Annotated[str | None, opt(S, "system")] = None,
    template: Annotated[str | None, opt(S, "template")] = None,
    model: Annotated[str | None, opt(S, "model", "--model", "-m")] = None,
    tokenizer: Annotated[str | None, opt(S, "tokenizer")] = None,
    split: Annotated[str | None, opt(S, "split")] = None,
    seed: Annotated[int | None, opt(S, "seed")] = None,
    stratify_by: Annotated[str | None, opt(S, "stratify_by")] = None,
    group_by: Annotated[str | None, opt(S, "group_by")] = None,
    on_error: Annotated[str | None, opt(S, "on_error")] = None,
    max_error_rate: Annotated[float | None, opt(S, "max_error_rate")] = None,
    max_chars: Annotated[int | None, opt(S, "max_chars")] = None,
    max_tokens: Annotated[int | None, opt(S, "max_tokens")] = None,
    dedupe: Annotated[bool | None, opt(S, "dedupe")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite", "--overwrite")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Validate, deduplicate and split raw JSONL/JSON records into mlx-lm train/valid/test.jsonl."""
    params = dict(locals())
    params["inputs"] = [str(p) for p in inputs] if inputs else None
    params["field_map"] = field_map or None
    run_command("prepare", params, _render)


def _render(result: Any, settings: S) -> None:
    counts = result.counts
    typer.echo(f"{result.out}: train {counts['train']}, valid {counts['valid']}, test {counts['test']}"
               + (f", rejected {counts['rejected']} (see rejected.jsonl)" if counts["rejected"] else ""))
    typer.echo(f"manifest: {result.manifest}")
