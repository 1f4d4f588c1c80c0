"""`lorakit fuse`: merge a LoRA/DoRA adapter into its base and ship one verified model directory.

The directory loads with `mlx_lm.load` and, when float, with transformers; `--export-gguf` adds a GGUF for
llama.cpp. Nothing is shipped unless the saved model, loaded back from disk, reproduces base+adapter logits
on a few fixed prompts.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from lorakit.engine.export.gguf_adapter import GgufAdapterExport
from lorakit.engine.export.gguf_export import GgufExport, check_exportable
from lorakit.engine.export.gguf_outputs import GgufInputs, GgufTargets, gguf_targets, write_ggufs
from lorakit.engine.export.hf_export import has_gguf_layout, hf_config, make_tokenizer_portable, to_hf_rows
from lorakit.engine.model.adapters import load_adapter, read_adapter_config, resolve_adapter_dir
from lorakit.engine.model.loading import LoadedModel, dequantize_float32, load_model
from lorakit.engine.reporter import Reporter
from lorakit.errors import RunError, UserError
from lorakit.io import (
    check_output_location,
    ensure_new_dir,
    output_lock,
    replace_dir,
    staging_dir,
    write_json,
)
from lorakit.settings import FuseSettings, save_settings

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer:",
)
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I reset my password?"},
]
# Allowed max logit difference, as a share of the largest reference logit, by the coarsest dtype involved.
RELATIVE_TOLERANCE = {mx.float32: 1e-3, mx.float16: 2e-2, mx.bfloat16: 8e-2}


@dataclass
class LogitDiff:
    max: float
    mean: float
    top1_agreement: float  # share of positions whose most likely next token is the same


@dataclass
class FuseCheck:
    """Fused model (as saved) vs base+adapter on the verification prompts."""

    passed: bool
    prompts: int
    positions: int
    max_logit_diff: float
    mean_logit_diff: float
    top1_agreement: float
    tolerance: float
    adapter_effect: float  # max |base+adapter - base|: what a fuse that dropped the adapter would miss


@dataclass
class FuseResult:
    out: str
    model: str
    adapter: str
    fine_tune_type: str
    fused_layers: int
    dtype: str
    quantization: dict | None
    transformers_compatible: bool
    qk_rows_restored: bool  # llama.cpp's q/k row order of a GGUF-sourced base put back in Hugging Face order
    files: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    check: FuseCheck | None = None
    requantize_error: LogitDiff | None = None
    gguf: GgufExport | None = None
    gguf_adapter: GgufAdapterExport | None = None
    seconds: float = 0.0


@dataclass
class _Merged:
    """The fused model in memory, and the logits its checks compare (on the verification prompts)."""

    model: nn.Module
    adapter_dir: Path
    adapter_config: dict
    layers: int
    base_dtype: mx.Dtype
    out_dtype: mx.Dtype
    prompts: list[list[int]]
    base_logits: list[mx.array] | None  # the base alone (--verify)
    reference: list[mx.array] | None  # base+adapter, unfused (--verify)
    fused_float: list[mx.array] | None  # fused, before re-quantizing (--requantize)


def run(settings: FuseSettings, reporter: Reporter) -> FuseResult:
    start = time.perf_counter()
    targets = gguf_targets(settings)
    _check_outside_inputs(settings, targets)
    with contextlib.ExitStack() as locks:
        locks.enter_context(output_lock(settings.out, "--out"))
        for flag, path in targets.outputs():
            if _relative_to(path, settings.out) is None:
                locks.enter_context(output_lock(path, flag))
        result = _fuse(settings, targets, reporter)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _check_outside_inputs(settings: FuseSettings, targets: GgufTargets) -> None:
    """--out (and the GGUF files) must neither be, contain nor sit inside --model or --adapter-path: an
    --overwrite would replace the very files it reads."""
    inputs = [("--model", settings.model), ("--adapter-path", settings.adapter_path)]
    check_output_location(settings.out, "--out", inputs)
    for flag, path in targets.outputs():
        check_output_location(path, flag, inputs)


def _fuse(settings: FuseSettings, targets: GgufTargets, reporter: Reporter) -> FuseResult:
    """The fuse itself, under the output locks."""
    out = ensure_new_dir(settings.out, settings.overwrite)
    resolve_adapter_dir(settings.adapter_path)  # a wrong path fails before the model loads

    loaded = load_model(settings.model_copy(update={"dtype": None}), reporter)
    if targets.model is not None or targets.adapter is not None:
        check_exportable(loaded.config)
    merged = _merge(loaded, settings, reporter)
    if settings.requantize:
        _check_requantizable(merged.model, settings, loaded.config, reporter)
    result = FuseResult(
        out=str(out), model=settings.model, adapter=str(merged.adapter_dir),
        fine_tune_type=merged.adapter_config.get("fine_tune_type", "lora"), fused_layers=merged.layers,
        dtype=_dtype_name(merged.out_dtype), quantization=None,
        transformers_compatible=settings.requantize is None,
        qk_rows_restored=has_gguf_layout(loaded.config),
    )
    _ship(out, targets, loaded, merged, settings, result, reporter)
    for export in (result.gguf, result.gguf_adapter):
        if export is not None:
            export.size_bytes = Path(export.path).stat().st_size
    reporter.on_save(str(out), 0)
    return result


def _merge(loaded: LoadedModel, settings: FuseSettings, reporter: Reporter) -> _Merged:
    """Apply the adapter and fuse it into float weights of the output dtype, keeping the logits to check."""
    base_dtype = _float_dtype(loaded.model)
    out_dtype = getattr(mx, settings.dtype) if settings.dtype else base_dtype
    needed = settings.verify or settings.requantize
    prompts = _verification_prompts(loaded, settings, reporter) if needed else []
    base_logits = _logits(loaded.model, prompts) if settings.verify else None

    adapter_dir = load_adapter(loaded, settings.adapter_path, reporter)
    adapter_config = read_adapter_config(adapter_dir)
    _warn_if_qlora(adapter_config, loaded, reporter)
    reference = _logits(loaded.model, prompts) if settings.verify else None

    model = loaded.model
    if out_dtype == mx.float32:  # de-quantize the base (under the adapters too) in float32, not in its scales' float16
        dequantize_float32(model)
    layers = _fuse_layers(model)
    reporter.log(f"fused {layers} adapted layers from {adapter_dir}")
    _dequantize(model)
    model.set_dtype(out_dtype)
    mx.eval(model.parameters())
    fused_float = _logits(model, prompts) if settings.requantize else None
    return _Merged(model=model, adapter_dir=adapter_dir, adapter_config=adapter_config, layers=layers,
                   base_dtype=base_dtype, out_dtype=out_dtype, prompts=prompts, base_logits=base_logits,
                   reference=reference, fused_float=fused_float)


def _ship(out: Path, targets: GgufTargets, loaded: LoadedModel, merged: _Merged, settings: FuseSettings,
          result: FuseResult, reporter: Reporter) -> None:
    """Save the fused model (and the GGUF) into a staging directory, check the model as saved, then move it
    into place: nothing is shipped unless it passes."""
    model = merged.model
    config = hf_config(loaded.config, merged.out_dtype, result.qk_rows_restored)
    staging = staging_dir(out)
    try:
        with contextlib.ExitStack() as stack:
            _copy_tokenizer(loaded, staging)
            weights = dict(tree_flatten(model.parameters()))
            if result.qk_rows_restored:
                weights = to_hf_rows(weights, loaded.config)
                model.update(tree_unflatten(list(weights.items())))
                reporter.log("put the GGUF base's q/k rows back in Hugging Face order (standard RoPE config)")
            inputs = GgufInputs(weights, config, loaded, merged.adapter_dir, merged.prompts)
            result.gguf, result.gguf_adapter = write_ggufs(stack, staging, out, targets, inputs, settings,
                                                           reporter)
            del weights, inputs
            if settings.requantize:
                config, result.quantization = _requantize(model, config, settings, loaded.config)
            _save(staging, model, config)
            _verify(staging, merged, settings, result, reporter)
            _write_records(staging, settings, result)
            result.files = {str(p.relative_to(staging)): p.stat().st_size
                            for p in sorted(staging.rglob("*")) if p.is_file()}
            result.size_bytes = sum(result.files.values())
            replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_tokenizer(loaded: LoadedModel, directory: Path) -> None:
    """Tokenizer files and the chat template, plus the base's generation config and SentencePiece model;
    tokenizer_config.json is written so that transformers 4.46+ and 5.x both load it."""
    loaded.tokenizer.save_pretrained(str(directory))
    make_tokenizer_portable(directory)
    for name in ("generation_config.json", "tokenizer.model"):
        if (loaded.path / name).exists() and not (directory / name).exists():
            shutil.copy(loaded.path / name, directory / name)


def _verify(staging: Path, merged: _Merged, settings: FuseSettings, result: FuseResult,
            reporter: Reporter) -> None:
    """Compare the saved model, loaded back, with base+adapter (--verify; a re-quantized output is checked
    before quantizing) and measure what --requantize changed."""
    if not (settings.verify or settings.requantize):
        return
    shipped = _shipped_logits(staging, merged.prompts)
    if settings.verify:
        result.check = _check(shipped if not settings.requantize else merged.fused_float, merged.reference,
                              merged.base_logits, settings, (merged.base_dtype, merged.out_dtype))
        if not result.check.passed:
            raise RunError(
                f"verification failed: the fused model's logits differ from base+adapter by "
                f"{result.check.max_logit_diff:.4g} (tolerance {result.check.tolerance:.4g}) on "
                f"{result.check.prompts} prompts; nothing was written to {result.out}. Rerun with --debug "
                "and report it; --verify-tolerance raises the bound if the difference is expected")
        _warn_if_indistinguishable(result.check, reporter)
    if settings.requantize:
        result.requantize_error = _diff(shipped, merged.fused_float)


def _relative_to(path: Path, directory: Path) -> Path | None:
    try:
        return path.resolve().relative_to(directory.resolve())
    except ValueError:
        return None


def _float_dtype(model: nn.Module) -> mx.Dtype:
    """The base's float type: its most common floating parameter dtype (the scales' for a quantized base)."""
    dtypes = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return max(set(dtypes), key=dtypes.count) if dtypes else mx.float16


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def _verification_prompts(loaded: LoadedModel, settings: FuseSettings, reporter: Reporter) -> list[list[int]]:
    """The fixed texts, and a chat through the model's chat template when it has one. A template that
    cannot render it is a user error when --verify needs it; else the check runs on the texts alone."""
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    if not tokenizer.has_chat_template:
        return prompts
    try:
        prompts.append(list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)))
    except Exception as e:  # noqa: BLE001  (jinja raises anything: SecurityError, TypeError, ...)
        where = _template_location(loaded.path, e)
        problem = (f"--model {settings.model}: its chat template ({where}) cannot render a chat "
                   f"({type(e).__name__}: {e})")
        if settings.verify:
            raise UserError(f"{problem}; fix the template, or pass --no-verify to fuse without the check "
                            "that renders it") from None
        reporter.warn(f"{problem}; the re-quantization error is measured on plain text only")
    return prompts


def _template_location(model_dir: Path, error: Exception) -> str:
    """Where the model's chat template lives, and the template line the error came from (when jinja says)."""
    jinja = model_dir / "chat_template.jinja"
    where = str(jinja) if jinja.is_file() else f"'chat_template' in {model_dir / 'tokenizer_config.json'}"
    frames = traceback.extract_tb(error.__traceback__)
    lines = [frame.lineno for frame in frames if frame.filename == "<template>"]
    return f"{where}, line {lines[-1]}" if lines else where


def _logits(model: nn.Module, prompts: list[list[int]]) -> list[mx.array]:
    out = []
    for ids in prompts:
        logits = model(mx.array(ids)[None])[0].astype(mx.float32)
        mx.eval(logits)
        out.append(logits)
    return out


def _diff(a: list[mx.array], b: list[mx.array]) -> LogitDiff:
    gaps = [mx.abs(x - y) for x, y in zip(a, b, strict=True)]
    positions = sum(g.shape[0] for g in gaps)
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return LogitDiff(max=max(float(g.max()) for g in gaps),
                     mean=sum(float(g.sum()) for g in gaps) / sum(g.size for g in gaps),
                     top1_agreement=agree / positions)


def _check(fused: list[mx.array], reference: list[mx.array], base: list[mx.array], settings: FuseSettings,
           dtypes: tuple[mx.Dtype, ...]) -> FuseCheck:
    diff = _diff(fused, reference)
    if settings.verify_tolerance is not None:
        tolerance = settings.verify_tolerance
    else:
        scale = max(float(mx.abs(r).max()) for r in reference)
        tolerance = max(RELATIVE_TOLERANCE.get(d, 8e-2) for d in dtypes) * max(scale, 1.0)
    return FuseCheck(passed=diff.max <= tolerance, prompts=len(reference),
                     positions=sum(r.shape[0] for r in reference), max_logit_diff=diff.max,
                     mean_logit_diff=diff.mean, top1_agreement=diff.top1_agreement, tolerance=tolerance,
                     adapter_effect=_diff(reference, base).max)


def _warn_if_indistinguishable(check: FuseCheck, reporter: Reporter) -> None:
    if check.adapter_effect <= check.tolerance:
        reporter.warn(f"the adapter changes the logits by at most {check.adapter_effect:.3g}, within the "
                      f"check's tolerance {check.tolerance:.3g}: the check cannot tell the fused model from "
                      "the base. Is this adapter trained?")


def _warn_if_qlora(adapter_config: dict, loaded: LoadedModel, reporter: Reporter) -> None:
    bits = ((adapter_config.get("lorakit") or {}).get("settings") or {}).get("quantize")
    if bits and "quantization" not in loaded.config:
        reporter.warn(f"the adapter was trained on the base quantized to {bits} bits (QLoRA); fusing into "
                      f"the float weights. Pass --quantize {bits} to fuse into the weights it was trained "
                      "on.")


def _fuse_layers(model: nn.Module) -> int:
    """Replace every LoRA/DoRA layer by the plain linear its own `fuse()` returns (float weights)."""
    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def _dequantize(model: nn.Module) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)


def _requant_group(settings: FuseSettings, base_config: dict) -> tuple[int, str]:
    """--requantize's group size and where it comes from: --q-group-size, else a quantized base's own."""
    if "q_group_size" not in settings.model_fields_set and "quantization" in base_config:
        return base_config["quantization"].get("group_size", settings.q_group_size), "the base's group size"
    return settings.q_group_size, "--q-group-size"


def _quantizable(group: int):
    """nn.quantize's class_predicate: a quantizable layer whose input size divides by the group size."""
    return lambda _, m: _has_weights(m) and m.weight.shape[-1] % group == 0


def _has_weights(module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") and hasattr(module, "weight")


def _check_requantizable(model: nn.Module, settings: FuseSettings, base_config: dict,
                         reporter: Reporter) -> None:
    """A --requantize that would quantize nothing is an error; one that leaves layers float says so."""
    group, source = _requant_group(settings, base_config)
    layers = [(name, m) for name, m in model.named_modules() if _has_weights(m)]
    fits = sum(_quantizable(group)(name, m) for name, m in layers)
    bits = settings.requantize
    if layers and not fits:
        raise UserError(f"--requantize {bits}: no layer's input size divides by {group} ({source}), so "
                        "nothing would be quantized; pass a --q-group-size that divides them (32, 64 or 128)")
    if fits < len(layers):
        reporter.warn(f"--requantize {bits}: {len(layers) - fits} of {len(layers)} layers stay float (their "
                      f"input size does not divide by {group}, {source})")


def _requantize(model: nn.Module, config: dict, settings: FuseSettings,
                base_config: dict) -> tuple[dict, dict]:
    """Quantize the fused model in mlx-lm's format; a quantized base's group size unless --q-group-size."""
    group, _ = _requant_group(settings, base_config)
    nn.quantize(model, group_size=group, bits=settings.requantize, class_predicate=_quantizable(group))
    quantization = {"group_size": group, "bits": settings.requantize}
    return {**config, "quantization": quantization}, quantization


def _save(directory: Path, model: nn.Module, config: dict) -> None:
    from mlx_lm.utils import save_config, save_model

    save_model(directory, model)
    save_config(dict(config), directory / "config.json")


def _shipped_logits(directory: Path, prompts: list[list[int]]) -> list[mx.array]:
    """Logits of the model as written: loaded back from disk, as a user of the output would."""
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(directory)
    return _logits(model, prompts)


def _write_records(directory: Path, settings: FuseSettings, result: FuseResult) -> None:
    save_settings(settings, directory / "lorakit.yaml")
    record = {k: v for k, v in asdict(result).items() if k not in ("files", "size_bytes", "seconds")}
    write_json(directory / "fuse.json", record)
