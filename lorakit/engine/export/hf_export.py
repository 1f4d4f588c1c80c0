"""Hugging Face layout for a fused model: HF tensor names, standard q/k rows, a config transformers reads,
and a tokenizer config that transformers 4.46+ and 5.x both load.

mlx-lm's llama module already uses LlamaForCausalLM's tensor names, so a float model from a Hugging Face
base needs only a clean config. A base converted from GGUF keeps llama.cpp's q/k row order (llama.cpp
permutes the rows of each head for its RoPE kernel) and runs with `rope_traditional: true`; transformers
knows neither, so those rows are put back in Hugging Face order and the flag is dropped.

The tokenizer is saved by the transformers installed here (5.x), whose tokenizer_config.json names a generic
class transformers 4 does not have (`TokenizersBackend`), lists `extra_special_tokens` where 4.x expects a
mapping, and keeps the chat template only in chat_template.jinja, which 4.46 does not read.
`portable_tokenizer_config` rewrites it in the spelling both read: the same tokenizer.json, encodings and
chat template under either major version.
"""

from __future__ import annotations

import json
from pathlib import Path
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


# The generic tokenizer classes transformers 5 writes; transformers 4 knows none of them.
# PreTrainedTokenizerFast (tokenizer.json as it is) loads in both: 5.x maps it to TokenizersBackend.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend", "SentencePieceBackend", "PythonBackend"}
_LOAD_ARGUMENTS = ("is_local", "local_files_only")  # from_pretrained's own arguments, which 5.x saves too
_CHAT_TEMPLATE_FILE = "chat_template.jinja"


def portable_tokenizer_config(config: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    """tokenizer_config.json as transformers 4.46+ and 5.x both read it (see the module docstring)."""
    out = {k: v for k, v in config.items() if k not in _LOAD_ARGUMENTS}
    if out.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES or not out.get("tokenizer_class"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.x reads a list only under its older name (it expects a mapping here)
        del out["extra_special_tokens"]
        if extra:
            out.setdefault("additional_special_tokens", extra)
    if chat_template and not out.get("chat_template"):
        out["chat_template"] = chat_template
    return out


def make_tokenizer_portable(directory: Path) -> None:
    """Rewrite a saved tokenizer's tokenizer_config.json so that transformers 4.46+ loads it as 5.x does."""
    from lorakit.io import write_json

    config_file = Path(directory) / "tokenizer_config.json"
    if not config_file.exists():
        return
    template_file = Path(directory) / _CHAT_TEMPLATE_FILE
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    write_json(config_file, portable_tokenizer_config(config, template))
