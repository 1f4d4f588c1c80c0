"""`lorakit models`: list the mlx-lm model directories converted from .gguf files (the cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import DebugOpt, JsonOpt, QuietOpt

if TYPE_CHECKING:
    from lorakit.engine.models import ModelsResult
    from lorakit.engine.reporter import Reporter
    from lorakit.settings import ModelsSettings

EXAMPLE = "lorakit models   (then: mlx_lm generate --model DIR)"


def command(
    ctx: typer.Context,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """List the model directories converted from .gguf files: each loads in mlx-lm as --model DIR."""
    run_command("models", ctx.params, _run, _render)


def _run(settings: ModelsSettings, reporter: Reporter) -> ModelsResult:
    from lorakit.engine import models as engine

    return engine.run(settings, reporter)


def _render(result: ModelsResult, settings: ModelsSettings) -> None:
    if not result.models:
        typer.echo(f"no converted models in {result.cache} (a .gguf given as --model is converted there)")
        return
    for model in result.models:
        quant = f"{model.quantization['bits']}-bit" if model.quantization else "float"
        source = model.source_path or model.source_file
        typer.echo(f"{model.path}\n  from {source} ({model.model_type}, {quant}, {model.size_bytes / 1e6:.1f} MB)")
