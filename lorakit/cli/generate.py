"""`lorakit generate`: thin CLI over lorakit.engine.generate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt, run_command
from lorakit.settings import GenerateSettings as S


def _render(result: Any, settings: Any) -> None:
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


def command(
    model: Annotated[Optional[str], opt(S, "model", "--model", "-m")] = None,
    adapter_path: Annotated[Optional[Path], opt(S, "adapter_path")] = None,
    prompt: Annotated[Optional[str], opt(S, "prompt", "--prompt", "-p")] = None,
    input: Annotated[Optional[Path], opt(S, "input", "--input", "-i")] = None,
    output: Annotated[Optional[Path], opt(S, "output", "--output", "-o")] = None,
    system: Annotated[Optional[str], opt(S, "system")] = None,
    chat_template: Annotated[Optional[bool], opt(S, "chat_template")] = None,
    compare_base: Annotated[Optional[bool], opt(S, "compare_base")] = None,
    max_tokens: Annotated[Optional[int], opt(S, "max_tokens")] = None,
    temp: Annotated[Optional[float], opt(S, "temp")] = None,
    top_p: Annotated[Optional[float], opt(S, "top_p")] = None,
    top_k: Annotated[Optional[int], opt(S, "top_k")] = None,
    min_p: Annotated[Optional[float], opt(S, "min_p")] = None,
    repetition_penalty: Annotated[Optional[float], opt(S, "repetition_penalty")] = None,
    stop: Annotated[Optional[list[str]], opt(S, "stop")] = None,
    seed: Annotated[Optional[int], opt(S, "seed")] = None,
    batch_size: Annotated[Optional[int], opt(S, "batch_size")] = None,
    overwrite: Annotated[Optional[bool], opt(S, "overwrite", "--overwrite")] = None,
    dtype: Annotated[Optional[str], opt(S, "dtype")] = None,
    quantize: Annotated[Optional[int], opt(S, "quantize")] = None,
    q_group_size: Annotated[Optional[int], opt(S, "q_group_size")] = None,
    revision: Annotated[Optional[str], opt(S, "revision")] = None,
    trust_remote_code: Annotated[Optional[bool], opt(S, "trust_remote_code", "--trust-remote-code")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Answer a prompt (streamed to stdout) or a JSONL file of prompts, with or without an adapter."""
    stop = ",".join(stop) if stop else None  # repeated --stop flags and comma-separated values both work
    run_command("generate", locals(), _render)
