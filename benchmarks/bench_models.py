"""Models for the training benchmark: the tiny fixture, a model path, or random weights of a real shape.

Random-weight models are built on the spot from mlx-lm's own model classes, so GPU runs need no download.
Shapes are copied from the public config.json of each model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LLAMA32_ROPE = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA32_ROPE,
        "tie_word_embeddings": True, "max_position_embeddings": 131072,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA32_ROPE, "factor": 8.0}, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    "llama-3.2-3b": {
        "model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA32_ROPE,
        "tie_word_embeddings": True, "max_position_embeddings": 131072,
    },
}


@dataclass
class BenchModel:
    model: Any  # mlx.nn.Module
    config: dict
    name: str
    path: Path | None  # a model directory when there is one (tiny fixture, given path)


def build(name: str, dtype: str, seed: int = 0, scratch: Path | None = None, quantize: int | None = None
          ) -> BenchModel:
    """Load or build the model `name` in `dtype` (same weights in every process for a given seed).

    `quantize` (4 or 8) quantizes a built shape as `mlx_lm convert -q` does (group size 64), for QLoRA runs.
    """
    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported, unless LORAKIT_NO_OPENBLAS=1 (keep it above the mlx import)
    import mlx.core as mx

    if name in SHAPES:
        import importlib

        config = dict(SHAPES[name])
        module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        mx.random.seed(seed)
        model = module.Model(module.ModelArgs.from_dict(config))
        model.set_dtype(getattr(mx, dtype))
        mx.eval(model.parameters())
        if quantize:
            from mlx_lm.utils import quantize_model

            model, config = quantize_model(model, config, group_size=64, bits=quantize)
            mx.eval(model.parameters())
        return BenchModel(model, config, name, None)
    if name == "tiny":
        from lorakit.testing import tiny_model_dir

        path = tiny_model_dir(Path(scratch or tempfile.mkdtemp(prefix="lorakit-bench-")) / "tiny", seed=seed)
    else:
        path = Path(name)
    from lorakit.engine.model.loading import load_model

    class _Opts:
        model = str(path)
        revision = None
        trust_remote_code = False
        quantize = None
        q_group_size = 64

    _Opts.dtype = None if dtype == "none" else dtype  # none: as the file stores it (a GGUF stays quantized)
    loaded = load_model(_Opts())
    return BenchModel(loaded.model, loaded.config, name, loaded.path)


def linear_counts(model: Any) -> tuple[int, int, int]:
    """(matmul params of the blocks, params of the output head, LoRA-eligible linear layers' in+out sum).

    Counted from the actual modules before LoRA is applied, so tied heads and GQA shapes are handled.
    """
    from mlx import nn

    body = 0
    lora_io = 0
    for block in model.layers:
        for _, m in block.named_modules():
            if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
                out_dim, in_dim = m.weight.shape[0], _in_dim(m)
                body += out_dim * in_dim
                lora_io += out_dim + in_dim
    inner = getattr(model, "model", model)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "weight"):
        head_params = head.weight.shape[0] * _in_dim(head)
    else:
        emb = inner.embed_tokens.weight
        head_params = emb.shape[0] * emb.shape[1]
    return body, head_params, lora_io


def _in_dim(layer: Any) -> int:
    from mlx import nn

    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


def attention_dims(config: dict) -> tuple[int, int]:
    """(layers, query heads x head_dim)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config["num_hidden_layers"], heads * head_dim
