"""The GGUF side of `lorakit fuse`: where --export-gguf, --gguf-adapter and their Ollama Modelfiles go, and
writing them, checked, into the fuse's staging (files inside --out) or beside their final paths (the rest).

Every file is renamed into place only when the whole fuse succeeds; the fused GGUF is read back and run
(gguf_check) when --verify is on, and a file beyond its type's tolerance fails the fuse (exit 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from lorakit.engine.export.gguf_adapter import GgufAdapterExport, export_gguf_adapter
from lorakit.engine.export.gguf_check import GgufCheck, check_gguf
from lorakit.engine.export.gguf_export import GgufExport, export_gguf
from lorakit.engine.export.ollama import MODELFILE, modelfile_text
from lorakit.engine.model.loading import LoadedModel
from lorakit.engine.reporter import Reporter
from lorakit.errors import RunError, UserError
from lorakit.io import atomic_path
from lorakit.settings import FuseSettings


@dataclass(frozen=True)
class GgufTargets:
    model: Path | None  # --export-gguf
    adapter: Path | None  # --gguf-adapter

    @property
    def model_modelfile(self) -> Path | None:
        return self.model.parent / MODELFILE if self.model else None

    @property
    def adapter_modelfile(self) -> Path | None:
        if self.adapter is None:
            return None
        shared = self.model is not None and self.model.parent.resolve() == self.adapter.parent.resolve()
        return self.adapter.parent / (f"{MODELFILE}.adapter" if shared else MODELFILE)

    def outputs(self) -> list[tuple[str, Path]]:
        """(flag, path) of every file these flags write."""
        pairs = [("--export-gguf", self.model), ("--export-gguf", self.model_modelfile),
                 ("--gguf-adapter", self.adapter), ("--gguf-adapter", self.adapter_modelfile)]
        return [(flag, path) for flag, path in pairs if path is not None]


def gguf_targets(settings: FuseSettings) -> GgufTargets:
    """Check --export-gguf and --gguf-adapter (and their Modelfiles) before any work."""
    targets = GgufTargets(_target(settings.export_gguf, "--export-gguf", settings),
                          _target(settings.gguf_adapter, "--gguf-adapter", settings))
    if targets.model and targets.adapter and targets.model.resolve() == targets.adapter.resolve():
        raise UserError(f"--gguf-adapter {targets.adapter}: the same file as --export-gguf; give each its own name")
    for flag, path in targets.outputs():
        if path.name.startswith(MODELFILE) and path.exists() and not settings.overwrite:
            raise UserError(f"{flag}: {path} exists (the Ollama Modelfile written beside the GGUF); pass "
                            "--overwrite to replace it")
    return targets


def _target(path: Path | None, flag: str, settings: FuseSettings) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.resolve() == Path(settings.out).resolve():
        raise UserError(f"{flag} {path}: the same path as --out; give a file name such as {path}.gguf")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name such as {path / 'model.gguf'}")
    if path.exists() and not settings.overwrite:
        raise UserError(f"{flag} {path}: file exists; pass --overwrite to replace it")
    return path


@dataclass
class GgufInputs:
    """What the GGUF files are written from."""

    weights: dict[str, mx.array]  # the fused float weights, Hugging Face names and rows
    config: dict  # the fused model's config.json
    loaded: LoadedModel  # the base as loaded (its config says whether it came from a GGUF)
    adapter_dir: Path
    prompts: list[list[int]]  # the verification prompts (--verify)


def write_ggufs(stack: contextlib.ExitStack, staging: Path, out: Path, targets: GgufTargets, inputs: GgufInputs,
                settings: FuseSettings, reporter: Reporter) -> tuple[GgufExport | None, GgufAdapterExport | None]:
    """Write the requested GGUF files and Modelfiles; each lands at its final path when `stack` closes."""
    model = adapter = None
    tokenizer = inputs.loaded.tokenizer
    template, eos = getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None)
    if targets.model is not None:
        model = export_gguf(inputs.weights, inputs.config, staging, _place(stack, staging, out, targets.model),
                            settings.gguf_type, name=out.name, reporter=reporter)
        if settings.verify:
            model.check = _check(Path(model.path), inputs, settings)
        model.path = str(targets.model)
        text = modelfile_text(f"./{targets.model.name}", None, template, eos)
        model.modelfile = _write_modelfile(stack, staging, out, targets.model_modelfile, text)
    if targets.adapter is not None:
        adapter = export_gguf_adapter(inputs.adapter_dir, inputs.loaded.config,
                                      _place(stack, staging, out, targets.adapter), name=f"{out.name}-adapter")
        adapter.path = str(targets.adapter)
        text = modelfile_text(_base_source(inputs.loaded), f"./{targets.adapter.name}", template, eos)
        adapter.modelfile = _write_modelfile(stack, staging, out, targets.adapter_modelfile, text)
    return model, adapter


def _place(stack: contextlib.ExitStack, staging: Path, out: Path, path: Path) -> Path:
    """Where to write `path` now: inside the staging dir if it belongs to --out, else a temp file beside it."""
    try:
        inside = path.resolve().relative_to(out.resolve())
    except ValueError:
        return stack.enter_context(atomic_path(path))
    target = staging / inside
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _write_modelfile(stack: contextlib.ExitStack, staging: Path, out: Path, path: Path, text: str) -> str:
    _place(stack, staging, out, path).write_text(text, encoding="utf-8")
    return str(path)


def _base_source(loaded: LoadedModel) -> str:
    """FROM for an adapter-only GGUF: the base's .gguf file, else its local model directory (Ollama imports
    safetensors directories of these families)."""
    if loaded.source == "gguf":
        return str(Path(loaded.name).expanduser().resolve())
    return str(Path(loaded.path).resolve())


def _check(path: Path, inputs: GgufInputs, settings: FuseSettings) -> GgufCheck:
    """The written GGUF, read back and run, against the fused model: beyond the type's tolerance, exit 1."""
    check = check_gguf(path, inputs.config, inputs.weights, inputs.prompts, settings.gguf_type)
    if not check.passed:
        raise RunError(
            f"GGUF check failed: {settings.export_gguf} ({settings.gguf_type}) read back differs from the fused "
            f"model by {check.max_logit_diff:.4g} max logit difference (tolerance {check.tolerance:.4g}), top-1 "
            f"agreement {check.top1_agreement:.1%}, greedy agreement {check.greedy_agreement:.1%}; from the fused "
            f"model rounded to {settings.gguf_type} in memory by {check.layout_max_diff:.4g} (tolerance "
            f"{check.layout_tolerance:.4g}: above it the file's layout is wrong, a bug to report with --debug). "
            "Nothing was written. If only the rounding is beyond it, a wider --gguf-type keeps more (f16, bf16, q8_0)")
    return check
