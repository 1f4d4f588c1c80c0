"""Hugging Face layout for a fused model: HF tensor names, standard q/k rows, a config transformers reads.

mlx-lm's llama module already uses LlamaForCausalLM's tensor names, so a float model from a Hugging Face
base needs only a clean config. A base converted from GGUF keeps llama.cpp's q/k row order (llama.cpp
permutes the rows of each head for its RoPE kernel) and runs with `rope_traditional: true`; transformers
knows neither, so those rows are put back in Hugging Face order and the flag is dropped.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "phi3": "Phi3ForCausalLM"}


def permute_rows(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): Hugging Face q/k rows -> GGUF rows, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """The inverse of `permute_rows`: GGUF q/k rows -> Hugging Face rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def has_gguf_layout(config: dict) -> bool:
    """A llama converted from GGUF whose q/k rows are still in llama.cpp's order (see gguf_import)."""
    source = config.get("lorakit_source") or {}
    return source.get("format") == "gguf" and bool(config.get("rope_traditional")) \
        and config.get("model_type") == "llama"


def qk_heads(name: str, config: dict) -> int | None:
    """How many heads the rows of this q/k projection tensor hold (None for any other tensor)."""
    heads = config["num_attention_heads"]
    if ".self_attn.q_proj." in name:
        return heads
    if ".self_attn.k_proj." in name:
        return config.get("num_key_value_heads") or heads
    return None


def to_hf_rows(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Put q/k rows of a GGUF-layout model back in Hugging Face order (weights and biases alike)."""
    out = {}
    for name, w in weights.items():
        heads = qk_heads(name, config)
        out[name] = unpermute_rows(w, heads) if heads else w
    return out


def hf_config(config: dict, dtype: mx.Dtype, rows_restored: bool) -> dict[str, Any]:
    """The config of a float fused model: no quantization, no GGUF provenance, and standard RoPE once the
    q/k rows are back in Hugging Face order."""
    dropped = {"quantization", "quantization_config", "lorakit_source"}
    if rows_restored:
        dropped.add("rope_traditional")
    out = {k: v for k, v in config.items() if k not in dropped}
    model_type = out.get("model_type")
    if not out.get("architectures") and model_type in _ARCHITECTURES:
        out["architectures"] = [_ARCHITECTURES[model_type]]
    out["torch_dtype"] = str(dtype).split(".")[-1]
    return out
