"""The model families lorakit writes to and reads from GGUF, and how each differs from a plain llama.

Names come from the `gguf` package's tensor map for the family's llama.cpp architecture; what the map does not
say follows llama.cpp's convert_hf_to_gguf.py:
- llama/mistral: q/k rows permuted per head for llama.cpp's RoPE kernel (the only "normal"-RoPE family here);
- gemma/gemma2: RMSNorm weights stored with Gemma's `1 + w` folded in (`+1` on export, `-1` on import);
- qwen2 (q/k/v biases), qwen3 (q/k norms) and phi3 (fused qkv and gate_up projections) need no rewriting:
  mlx-lm already uses the Hugging Face tensor names the map knows.
Hyperparameters every family shares are written by gguf_export; each family adds its own here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import mlx.core as mx

from lorakit.engine.export.hf_export import permute_rows, qk_heads

Getter = Callable[..., Any]  # key under "<arch>." (and a default) -> metadata value


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    model_type: str  # mlx-lm's model_type for a file of this architecture
    hf_class: str
    write_hparams: Callable[[gguf.GGUFWriter, dict], None]  # metadata beyond the shared keys
    read_config: Callable[[Getter, dict], dict]  # config.json keys beyond the shared ones
    permutes_qk: bool = False  # llama.cpp permutes q/k rows (rope_traditional after import)
    norm_offset: float = 0.0  # added to every RMSNorm weight in the file

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _llama_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_rope_dimension_count(head_dim(config))
    scaling = config.get("rope_scaling")
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _gemma2_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping", 50.0)))
    writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping", 30.0)))
    writer.add_sliding_window(int(config.get("sliding_window") or 4096))


def _phi3_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    rotary = config.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(rotary * config["hidden_size"]) // config["num_attention_heads"])
    writer.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings")
                                             or config.get("max_position_embeddings") or 4096))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))  # 0: no window, as for Phi-4


def _no_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    del writer, config


def _llama_config(get: Getter, config: dict) -> dict:
    return {"rope_traditional": True}


def _plain_config(get: Getter, config: dict) -> dict:
    return {"rope_traditional": False}


def _gemma2_config(get: Getter, config: dict) -> dict:
    return {"rope_traditional": False, "attn_logit_softcapping": get("attn_logit_softcapping", 50.0),
            "final_logit_softcapping": get("final_logit_softcapping", 30.0),
            "query_pre_attn_scalar": gemma2_attention_scalar(config)}


def _phi3_config(get: Getter, config: dict) -> dict:
    rope_dims = get("rope.dimension_count") or config["head_dim"]
    return {"rope_traditional": False, "partial_rotary_factor": rope_dims / config["head_dim"],
            "original_max_position_embeddings": get("rope.scaling.original_context_length",
                                                    config["max_position_embeddings"]),
            "tie_word_embeddings": config["tie_word_embeddings"]}


def gemma2_attention_scalar(config: dict) -> float:
    """The query scale llama.cpp uses for Gemma 2: 1/sqrt(hidden/heads) for the 46-layer 27B, else head_dim."""
    if config["num_hidden_layers"] == 46:
        return config["hidden_size"] / config["num_attention_heads"]
    return config["head_dim"]


LLAMA = Family(gguf.MODEL_ARCH.LLAMA, "llama", "LlamaForCausalLM", _llama_hparams, _llama_config, permutes_qk=True)
QWEN2 = Family(gguf.MODEL_ARCH.QWEN2, "qwen2", "Qwen2ForCausalLM", _no_hparams, _plain_config)
QWEN3 = Family(gguf.MODEL_ARCH.QWEN3, "qwen3", "Qwen3ForCausalLM", _no_hparams, _plain_config)
GEMMA = Family(gguf.MODEL_ARCH.GEMMA, "gemma", "GemmaForCausalLM", _no_hparams, _plain_config, norm_offset=1.0)
GEMMA2 = Family(gguf.MODEL_ARCH.GEMMA2, "gemma2", "Gemma2ForCausalLM", _gemma2_hparams, _gemma2_config,
                norm_offset=1.0)
PHI3 = Family(gguf.MODEL_ARCH.PHI3, "phi3", "Phi3ForCausalLM", _phi3_hparams, _phi3_config)

BY_MODEL_TYPE = {"llama": LLAMA, "mistral": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "gemma": GEMMA,
                 "gemma2": GEMMA2, "phi3": PHI3}  # mistral is a llama to llama.cpp (convert_hf_to_gguf.py)
BY_ARCH = {f.arch_name: f for f in (LLAMA, QWEN2, QWEN3, GEMMA, GEMMA2, PHI3)}


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def name_map(family: Family, config: dict) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])


def gguf_name(names: gguf.TensorNameMap, key: str) -> str | None:
    """The GGUF name of an mlx-lm / Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`)."""
    return names.get_name(key, try_suffixes=(".weight", ".bias"))


def to_gguf_layout(family: Family, key: str, value: mx.array, config: dict) -> mx.array:
    """One tensor as llama.cpp stores it for this family (Hugging Face row order in, GGUF layout out)."""
    heads = qk_heads(key, config) if family.permutes_qk else None
    if heads:
        value = permute_rows(value, heads)
    if family.norm_offset and key.endswith("norm.weight"):
        value = value.astype(mx.float32) + family.norm_offset
    return value


def from_gguf_layout(family: Family, key: str, value: mx.array) -> mx.array:
    """One GGUF tensor for mlx-lm (q/k rows stay permuted: the imported config says rope_traditional)."""
    if family.norm_offset and key.endswith("norm.weight"):
        return (value.astype(mx.float32) - family.norm_offset).astype(value.dtype)
    return value
