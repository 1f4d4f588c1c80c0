"""`lorakit fuse`: merge an adapter into its base, verified, optionally with a GGUF export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import (
    ConfigOpt,
    DebugOpt,
    JsonOpt,
    ModelOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    TrustRemoteCodeOpt,
    opt,
)
from lorakit.settings import FuseSettings as S

if TYPE_CHECKING:
    from lorakit.engine.fuse import FuseResult
    from lorakit.engine.reporter import Reporter


EXAMPLE = "lorakit fuse -m M --adapter-path runs/s --out runs/fused"


def command(
    ctx: typer.Context,
    model: ModelOpt = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    out: Annotated[Path | None, opt(S, "out")] = None,
    dtype: Annotated[str | None, opt(S, "dtype")] = None,  # fuse's own: the fused weights' type
    requantize: Annotated[int | None, opt(S, "requantize")] = None,
    q_group_size: Annotated[int | None, opt(S, "q_group_size")] = None,  # fuse's own: also --requantize's
    export_gguf: Annotated[Path | None, opt(S, "export_gguf")] = None,
    gguf_type: Annotated[str | None, opt(S, "gguf_type")] = None,
    gguf_adapter: Annotated[Path | None, opt(S, "gguf_adapter")] = None,
    verify: Annotated[bool | None, opt(S, "verify")] = None,
    verify_tolerance: Annotated[float | None, opt(S, "verify_tolerance")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    quantize: QuantizeOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Merge a LoRA/DoRA adapter into its base: one verified model directory for MLX and transformers,
    optionally a GGUF for llama.cpp."""
    run_command("fuse", ctx.params, _run, _render, _summary)


def _run(settings: S, reporter: Reporter) -> FuseResult:
    from lorakit.engine import fuse as engine

    return engine.run(settings, reporter)


def _summary(result: FuseResult, reporter: Reporter) -> None:
    """The verification and the re-quantization error in full (stderr)."""
    check, err = result.check, result.requantize_error
    if check is not None:
        reporter.log(f"verification: max logit difference {check.max_logit_diff:.3g} (tolerance "
                     f"{check.tolerance:.3g}), top-1 agreement {check.top1_agreement:.1%} over {check.positions} "
                     f"positions; the adapter itself moves logits by up to {check.adapter_effect:.3g}")
    if err is not None and result.quantization:
        reporter.log(f"re-quantization to {result.quantization['bits']} bits changed the logits by at most "
                     f"{err.max:.4g} (mean {err.mean:.4g}); top-1 agreement {err.top1_agreement:.1%}")


def _render(result: FuseResult, settings: S) -> None:
    from lorakit.cli.reporting import out_console

    console = out_console()
    quant = f", re-quantized to {result.quantization['bits']} bits" if result.quantization else ""
    console.print(f"fused model: {result.out} ({result.size_bytes / 1e6:.1f} MB, {result.dtype}{quant}, "
                  f"{result.fused_layers} layers fused)")
    if result.check is not None:
        check = result.check
        console.print(f"verified: max logit difference {check.max_logit_diff:.3g} vs base+adapter "
                      f"(tolerance {check.tolerance:.3g}), top-1 agreement {check.top1_agreement:.1%}")
    if result.requantize_error is not None:
        err = result.requantize_error
        console.print(f"re-quantization error: max logit difference {err.max:.3g}, mean {err.mean:.3g}, "
                      f"top-1 agreement {err.top1_agreement:.1%}")
    if result.gguf is not None:
        console.print(f"gguf: {result.gguf.path} ({result.gguf.size_bytes / 1e6:.1f} MB, {result.gguf.type}); "
                      f"Ollama: {result.gguf.modelfile}")
        if result.gguf.check is not None:
            check = result.gguf.check
            console.print(f"gguf checked: max logit difference {check.max_logit_diff:.3g} vs the fused model "
                          f"(tolerance {check.tolerance:.3g}), top-1 agreement {check.top1_agreement:.1%}, greedy "
                          f"agreement {check.greedy_agreement:.1%} over {check.greedy_tokens} tokens; layout "
                          f"{check.layout_max_diff:.2g} (tolerance {check.layout_tolerance:.2g})")
    if result.gguf_adapter is not None:
        lora = result.gguf_adapter
        console.print(f"gguf adapter: {lora.path} ({lora.size_bytes / 1e6:.1f} MB, {lora.tensors} LoRA pairs, "
                      f"alpha {lora.alpha:g}); Ollama: {lora.modelfile}")
