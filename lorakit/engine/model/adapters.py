"""Adapters in mlx-lm's layout (adapter_config.json + adapters.safetensors): apply, save, find, load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lorakit.engine.model.loading import LoadedModel, base_signature
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import atomic_path, write_json
from lorakit.settings import TARGET_PRESETS

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_LINEAR = (nn.Linear, nn.QuantizedLinear)


def target_keys(model: nn.Module, targets: list[str], num_layers: int) -> list[str]:
    """Module paths inside a block (e.g. 'self_attn.q_proj') that get LoRA, from names and presets."""
    blocks = model.layers if num_layers < 0 else model.layers[-num_layers:]
    linear = sorted({name for block in blocks for name, m in block.named_modules() if isinstance(m, _LINEAR)})
    wanted: set[str] = set()
    for t in targets:
        if t == "all-linear":
            wanted.update(linear)
            continue
        names = TARGET_PRESETS.get(t, [t])
        matched = [k for k in linear if any(k == n or k.endswith("." + n) for n in names)]
        if not matched:
            raise UserError(f"--target-modules: '{t}' matches no linear layer; the blocks have: {', '.join(linear)}")
        wanted.update(matched)
    return sorted(wanted)


def lora_config(settings: Any, model: nn.Module) -> dict:
    """The mlx-lm `lora_parameters` for these settings."""
    return {
        "rank": settings.lora_rank,
        "scale": settings.lora_scale,
        "dropout": settings.lora_dropout,
        "keys": target_keys(model, settings.target_modules, settings.num_layers),
    }


def apply_adapters(model: nn.Module, settings: Any) -> dict:
    """Freeze the base and insert LoRA/DoRA layers (or unfreeze everything for full). Returns lora_parameters."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if settings.fine_tune_type == "full":
        model.unfreeze()
        return {}
    params = lora_config(settings, model)
    model.freeze()
    num_layers = len(model.layers) if settings.num_layers < 0 else settings.num_layers
    linear_to_lora_layers(model, num_layers, params, use_dora=settings.fine_tune_type == "dora")
    return params


def adapter_config(settings: Any, loaded: LoadedModel, lora_parameters: dict,
                   rendering: dict | None = None) -> dict:
    """adapter_config.json: mlx-lm's keys (so mlx_lm.generate/fuse read it) plus a `lorakit` section.

    `rendering` (data.tokenized.rendering_of the train split) records how the training data was rendered, so
    that eval and generate render prompts the same way.
    """
    from lorakit.settings import settings_dict

    num_layers = len(loaded.model.layers) if settings.num_layers < 0 else settings.num_layers
    section: dict[str, Any] = {"settings": settings_dict(settings), "base": base_signature(loaded.config),
                               # the mlx-lm directory of the weights (a .gguf's converted one: `lorakit models`)
                               "model_dir": str(Path(loaded.path).resolve())}
    if rendering is not None:
        section["rendering"] = rendering
    return {
        "model": loaded.name,
        "fine_tune_type": settings.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora_parameters,
        "lorakit": section,
    }


def trained_rendering(config: dict) -> dict | None:
    """How the adapter's training data was rendered ({"format", "template", "train_on"}), or None for an
    adapter that does not say (older lorakit, mlx-lm's own)."""
    rendering = (config.get("lorakit") or {}).get("rendering")
    if not isinstance(rendering, dict) or rendering.get("format") not in ("chat", "completions", "text",
                                                                              "preference"):
        return None
    template = rendering.get("template")
    return {"format": rendering["format"], "template": template if isinstance(template, str) else None,
            "train_on": rendering.get("train_on")}


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model: nn.Module, directory: Path, config: dict) -> None:
    """Write adapters.safetensors and adapter_config.json atomically into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_FILE) as tmp:
        # mx.save_safetensors appends the suffix unless the name already has it
        target = tmp.with_suffix(".safetensors")
        mx.save_safetensors(str(target), trainable_weights(model), metadata={"format": "mlx"})
        target.replace(tmp)
    write_json(directory / CONFIG_FILE, config)


def resolve_adapter_dir(path: Path) -> Path:
    """The directory to load: `best/` when training left one, else the directory itself."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--adapter-path {path}: not found")
    best = path / "best"
    if (best / ADAPTER_FILE).exists() and (best / CONFIG_FILE).exists():
        return best
    if not (path / ADAPTER_FILE).exists() or not (path / CONFIG_FILE).exists():
        raise UserError(f"--adapter-path {path}: expected {CONFIG_FILE} and {ADAPTER_FILE} "
                        "(an adapter directory from `lorakit train` or mlx_lm.lora)")
    return path


def read_adapter_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{Path(path) / CONFIG_FILE}: invalid JSON ({e.msg})") from None


def check_base(config: dict, loaded: LoadedModel, adapter_dir: Path, reporter: Reporter) -> None:
    """Refuse an adapter trained on a base of another shape; warn when only the name differs."""
    trained = (config.get("lorakit") or {}).get("base")
    current = loaded.signature
    if trained:
        diffs = [f"{k}: adapter {trained.get(k)} vs model {current.get(k)}" for k in current
                 if trained.get(k) is not None and current.get(k) is not None and trained.get(k) != current.get(k)]
        if diffs:
            raise UserError(f"--adapter-path {adapter_dir}: trained on base '{config.get('model')}', which differs "
                            f"from --model {loaded.name} ({'; '.join(diffs)}). Pass the base it was trained on.")
    if config.get("model") and Path(str(config["model"])).name != Path(loaded.name).name:
        reporter.warn(f"adapter {adapter_dir} was trained on '{config['model']}', loading it on '{loaded.name}'")


def load_adapter(loaded: LoadedModel, path: Path, reporter: Reporter | None = None) -> Path:
    """Apply the adapter at `path` (its best/ if present) to `loaded.model`; return the directory used."""
    from mlx_lm.tuner.utils import load_adapters

    reporter = reporter or Reporter()
    directory = resolve_adapter_dir(path)
    config = read_adapter_config(directory)
    check_base(config, loaded, directory, reporter)
    try:
        load_adapters(loaded.model, str(directory))
    except ValueError as e:
        raise UserError(f"--adapter-path {directory}: does not fit --model {loaded.name}: {e}") from None
    except (RuntimeError, OSError) as e:  # mx.load on a cut or damaged file
        raise UserError(f"{directory / ADAPTER_FILE}: cannot read the adapter weights ({e}); the file is "
                        "damaged or incomplete: point --adapter-path at an intact checkpoint of "
                        "the run (its checkpoints/step-N directory) or train again") from None
    loaded.model.eval()
    return directory
