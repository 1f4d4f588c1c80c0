"""One model loader for every command: a hub id, a local mlx-lm / Hugging Face directory, or a .gguf file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    path: Path  # local model directory (the converted directory for a GGUF file)
    config: dict
    name: str  # what the user gave (--model), for messages and adapter_config.json
    source: str  # "hub", "dir" or "gguf"

    @property
    def signature(self) -> dict:
        """Shape facts an adapter must agree with (see adapters.check_base)."""
        return base_signature(self.config)


def base_signature(config: dict) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: config.get(k) for k in keys}


def _local_dir(path: Path) -> Path:
    if not (path / "config.json").exists():
        raise UserError(f"--model {path}: no config.json in this directory; expected an mlx-lm or Hugging Face "
                        "model directory (config.json, *.safetensors, tokenizer files) or a .gguf file")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"--model {path}: no *.safetensors weights in this directory")
    return path


def resolve_model_path(name: str, revision: str | None = None) -> tuple[Path, str]:
    """Map --model to a local directory and its source kind, downloading hub ids through mlx-lm."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"--model {name}: GGUF file not found")
        from lorakit.engine.gguf_import import convert_gguf

        return convert_gguf(path), "gguf"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name}: expected a model directory or a .gguf file")
        return _local_dir(path), "dir"
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"--model {name}: no such directory or file, and not a Hugging Face repo id (owner/name)")
    from mlx_lm.utils import _download

    try:
        return Path(_download(name, revision=revision)), "hub"
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated
        raise UserError(f"--model {name}: could not fetch from the Hugging Face hub ({type(e).__name__}: {e}). "
                        "Offline? Pass a local model directory or a .gguf file instead.") from None


def load_model(opts: Any, reporter: Reporter | None = None) -> LoadedModel:
    """Load model + tokenizer per the ModelOptions fields of `opts` (model, revision, dtype, quantize, ...)."""
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    reporter = reporter or Reporter()
    path, source = resolve_model_path(opts.model, getattr(opts, "revision", None))
    try:
        model, config = mlx_load_model(path, trust_remote_code=getattr(opts, "trust_remote_code", False))
    except ValueError as e:
        raise UserError(f"--model {opts.model}: {e}") from None
    except Exception as e:  # corrupt safetensors, missing tensors
        raise UserError(f"--model {opts.model}: could not load weights from {path} ({type(e).__name__}: {e})") from None
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    dtype = getattr(opts, "dtype", None)
    quantized = "quantization" in config
    if dtype:
        if quantized:
            from mlx_lm.utils import dequantize_model

            model = dequantize_model(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
            reporter.log(f"de-quantized the base to {dtype}")
        model.set_dtype(getattr(mx, dtype))
        quantized = False
    bits = getattr(opts, "quantize", None)
    if bits:
        if quantized:
            raise UserError(f"--quantize {bits}: the base model {opts.model} is already quantized")
        nn.quantize(model, group_size=opts.q_group_size, bits=bits)
        config["quantization"] = {"group_size": opts.q_group_size, "bits": bits}
    mx.eval(model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path(path), config=config, name=opts.model,
                       source=source)
