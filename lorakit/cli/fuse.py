"""`lorakit fuse`: thin CLI over lorakit.engine.fuse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt, run_command
from lorakit.settings import FuseSettings as S


def _render(result: Any, settings: Any) -> None:
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
        console.print(f"gguf: {result.gguf.path} ({result.gguf.size_bytes / 1e6:.1f} MB, {result.gguf.type})")


def command(
    model: Annotated[str | None, opt(S, "model", "--model", "-m")] = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    out: Annotated[Path | None, opt(S, "out", "--out", "-o")] = None,
    dtype: Annotated[str | None, opt(S, "dtype")] = None,
    requantize: Annotated[int | None, opt(S, "requantize")] = None,
    q_group_size: Annotated[int | None, opt(S, "q_group_size")] = None,
    export_gguf: Annotated[Path | None, opt(S, "export_gguf")] = None,
    gguf_type: Annotated[str | None, opt(S, "gguf_type")] = None,
    verify: Annotated[bool | None, opt(S, "verify")] = None,
    verify_tolerance: Annotated[float | None, opt(S, "verify_tolerance")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite", "--overwrite")] = None,
    quantize: Annotated[int | None, opt(S, "quantize")] = None,
    revision: Annotated[str | None, opt(S, "revision")] = None,
    trust_remote_code: Annotated[bool | None, opt(S, "trust_remote_code", "--trust-remote-code")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Merge a LoRA/DoRA adapter into its base: one verified model directory for MLX and transformers,
    optionally a GGUF for llama.cpp."""
    run_command("fuse", locals(), _render)
