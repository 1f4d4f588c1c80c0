"""`lorakit generate`: answer a prompt (streamed) or a JSONL file of prompts, with or without an adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import (
    ChatTemplateOpt,
    ConfigOpt,
    DebugOpt,
    DtypeOpt,
    JsonOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    QGroupSizeOpt,
    QuantizeOpt,
    QuietOpt,
    RepetitionPenaltyOpt,
    RevisionOpt,
    SeedOpt,
    StopOpt,
    TemplateOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    opt,
)
from lorakit.errors import UserError
from lorakit.settings import GenerateSettings as S

if TYPE_CHECKING:
    from lorakit.engine.generate import GenerateResult
    from lorakit.engine.reporter import Reporter


EXAMPLE = 'lorakit generate -m M --adapter-path runs/s --prompt "How do I pair it?"'


def command(
    ctx: typer.Context,
    model: ModelOpt = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    prompt: Annotated[str | None, opt(S, "prompt")] = None,
    input: Annotated[Path | None, opt(S, "input")] = None,
    output: Annotated[Path | None, opt(S, "output")] = None,
    system: Annotated[str | None, opt(S, "system")] = None,
    chat_template: ChatTemplateOpt = None,
    template: TemplateOpt = None,
    compare_base: Annotated[bool | None, opt(S, "compare_base")] = None,
    max_tokens: MaxTokensOpt = None,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    batch_size: Annotated[int | None, opt(S, "batch_size")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    dtype: DtypeOpt = None,
    quantize: QuantizeOpt = None,
    q_group_size: QGroupSizeOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Answer a prompt (streamed to stdout) or a JSONL file of prompts, with or without an adapter."""
    run_command("generate", ctx.params, _run, _render)


def _run(settings: S, reporter: Reporter) -> GenerateResult:
    from lorakit.engine import generate as engine

    settings = _read_stdin(settings)
    # Stream only when the answer is the whole output: --json and --compare-base print it afterwards.
    stream = settings.prompt is not None and not settings.json_output and not settings.compare_base
    return engine.run(settings, reporter, on_token=reporter.on_token if stream else None)


def _read_stdin(settings: S) -> S:
    """`--prompt -`: the prompt is what stdin holds."""
    if settings.prompt != "-" or settings.input is not None:  # the engine refuses --prompt with --input
        return settings
    prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("--prompt: empty prompt (nothing on stdin)")
    return settings.model_copy(update={"prompt": prompt})


def _render(result: GenerateResult, settings: S) -> None:
    from rich.table import Table

    from lorakit.cli.reporting import err_console, out_console

    if result.results is not None:
        for row in result.results:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif result.base_text is not None:
        table = Table(show_lines=True)
        table.add_column("base", overflow="fold")
        table.add_column(f"adapter ({result.adapter})", overflow="fold")
        table.add_row(result.base_text, result.text)
        out_console().print(table)
    elif result.text is not None:
        sys.stdout.write("\n")  # the text itself was streamed as it came (RichReporter.on_token)
    sys.stdout.flush()
    if result.text is not None and not settings.quiet:
        err_console().print(
            f"prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens/s | generation: "
            f"{result.generation_tokens} tokens, {result.generation_tps:.1f} tokens/s | peak memory: "
            f"{result.peak_memory:.3f} GB", highlight=False, soft_wrap=True)
