"""Convert a llama.cpp .gguf file into a normal model directory that mlx-lm loads.

The directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) is cached under
`$LORAKIT_CACHE/gguf/<sha256 of the file>`, written through a staging directory so a crash never leaves
half a cache. Q4_0/Q4_1/Q8_0 tensors stay MLX-quantized (affine, group size 32) so QLoRA works on them.
Tensor names are mapped back through the `gguf` package's name map for the file's architecture (see
gguf_families). llama.cpp permutes the q/k rows of llama-family models for its RoPE layout; the weights keep
that layout and config.json says `rope_traditional: true`, which is the same computation.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from lorakit.engine.export.gguf_families import BY_ARCH, Family, from_gguf_layout, gguf_name, name_map
from lorakit.engine.export.gguf_read import (
    check_header,
    dequantizable,
    dequantized_tensors,
    metadata,
    open_reader,
)
from lorakit.engine.export.gguf_tokenizer import build_tokenizer
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import cache_dir, replace_dir, sha256_file, staging_dir, write_json, write_text

GROUP_SIZE = 32  # MLX's GGUF reader unpacks Q4_0/Q4_1/Q8_0 blocks into affine groups of 32
KEPT_QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")
EXPANDED_TO_F16 = ("Q4_K", "Q6_K", "Q2_K")  # mx.load dequantizes these to float16
SUPPORTED = (f"{', '.join(KEPT_QUANTIZED)} (kept quantized), {', '.join(FLOAT_TYPES)} (float), "
             "any other type the gguf package reads (Q5_0, Q5_1, k-quants, ...: de-quantized to float16)")
SUPPORTED_ARCHITECTURES = ", ".join(BY_ARCH)


def convert_gguf(path: Path, reporter: Reporter | None = None) -> Path:
    """Return the cached model directory for this GGUF file, converting it on first use."""
    reporter = reporter or Reporter()
    path = Path(path)
    check_header(path)
    sha = _sha256_cached(path)
    target = cache_dir() / "gguf" / sha
    if (target / "config.json").is_file():
        return target
    reporter.log(f"converting {path.name} to an MLX model directory (once; cached at {target})")
    weights, meta = _read(path, reporter)
    config, weights = to_mlx(meta, weights, path)
    config.update(_quantization(weights))
    config["lorakit_source"] = {"format": "gguf", "file": path.name, "path": str(path.resolve()), "sha256": sha}
    tokenizer, tokenizer_config = build_tokenizer(meta, str(path), reporter.warn)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]

    staging = staging_dir(target)
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(staging / "config.json", config)
        write_text(staging / "tokenizer.json", tokenizer.to_str(pretty=False))
        write_json(staging / "tokenizer_config.json", tokenizer_config)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def to_mlx(meta: dict[str, Any], weights: dict[str, mx.array], path: Path) -> tuple[dict, dict[str, mx.array]]:
    """config.json and mlx-lm's weights for GGUF tensors (quantized or float) and metadata."""
    arch = meta.get("general.architecture")
    family = BY_ARCH.get(arch)
    if family is None:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                        f"{SUPPORTED_ARCHITECTURES} (llama covers Llama 2/3, Mistral, SmolLM, TinyLlama)")
    config = _config(meta, weights, family, path)
    return config, _rename(weights, family, config, path)


def _sha256_cached(path: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) so a second load does not re-hash gigabytes."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "gguf" / "by-stat" / key
    if memo.is_file():
        return memo.read_text().strip()
    sha = sha256_file(path)
    write_text(memo, sha)
    return sha


def _read(path: Path, reporter: Reporter) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata; types MLX's reader cannot unpack are de-quantized by the gguf package instead."""
    types = _tensor_types(path)
    unreadable = sorted(set(types.values()) - set(KEPT_QUANTIZED + FLOAT_TYPES + EXPANDED_TO_F16))
    refused = [kind for kind in unreadable if not dequantizable(kind)]
    if refused:
        raise UserError(f"{path}: tensor type(s) {', '.join(refused)} are not supported; supported: {SUPPORTED}. "
                        "Re-quantize it with llama.cpp's llama-quantize (e.g. to Q8_0 or Q4_0) or use an "
                        "F16 GGUF.")
    if unreadable:
        return _read_dequantized(path, unreadable, reporter)
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e}); check the file is a complete .gguf "
                        "(re-download it)") from None
    _notice_expanded(types, reporter)
    return _restore_bf16(path, weights, types), {k: _plain(v) for k, v in meta.items()}


def _read_dequantized(path: Path, kinds: list[str],
                      reporter: Reporter) -> tuple[dict[str, mx.array], dict[str, Any]]:
    reader = open_reader(path)
    weights = {}
    for name, value in dequantized_tensors(reader):
        weights[name] = mx.array(value.astype(np.float32 if value.ndim == 1 else np.float16))
    reporter.warn(f"this GGUF has {', '.join(kinds)} tensors, which MLX's reader cannot unpack: all its matrices "
                  "were de-quantized to float16 by the gguf package")
    return weights, metadata(reader)


def _plain(value: Any) -> Any:
    if isinstance(value, mx.array):
        if value.dtype == mx.float32 and value.ndim == 0:
            return float(f"{value.item():.7g}")  # 1e-05, not float32's 9.999999747378752e-06
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> llama.cpp type name (mx.load does not tell)."""
    return {t.name: t.tensor_type.name for t in open_reader(path).tensors}


def _restore_bf16(path: Path, weights: dict[str, mx.array], types: dict[str, str]) -> dict[str, mx.array]:
    """mx.load narrows BF16 to float16 (losing range); take those tensors' raw bits instead."""
    bf16 = [name for name, kind in types.items() if kind == "BF16"]
    if not bf16:
        return weights
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for name in bf16:
        bits = np.ascontiguousarray(tensors[name].data).view(np.uint16).reshape(weights[name].shape)
        weights[name] = mx.array(bits).view(mx.bfloat16)
    return weights


def _notice_expanded(types: dict[str, str], reporter: Reporter) -> None:
    expanded = Counter(kind for kind in types.values() if kind in EXPANDED_TO_F16)
    if expanded:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(expanded.items()))
        reporter.warn(f"GGUF tensors de-quantized to float16 ({kinds}): MLX keeps only "
                      f"{', '.join(KEPT_QUANTIZED)} quantized")


def _rename(weights: dict[str, mx.array], family: Family, config: dict, path: Path) -> dict[str, mx.array]:
    """GGUF tensor names -> mlx-lm names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
    by the gguf name map applied to every parameter the mlx-lm model of this config has."""
    names = name_map(family, config)
    inverse = {gguf_name(names, key): key for key in _parameter_names(config)}
    renamed, unknown = {}, []
    for name, value in weights.items():
        base, suffix = name.rsplit(".", 1)  # suffix: weight, bias, or scales/biases of a quantized weight
        key = inverse.get(name)
        if key is None and suffix in ("scales", "biases") and f"{base}.weight" in inverse:
            key = inverse[f"{base}.weight"].removesuffix("weight") + suffix
        if key is None:
            unknown.append(name)
        else:
            renamed[key] = from_gguf_layout(family, key, value)
    if unknown:
        raise UserError(f"{path}: unexpected tensors for a {family.arch_name} model: "
                        f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(inverse.values()) - set(renamed))
    if missing:
        raise UserError(f"{path}: tensors for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} are "
                        "missing; the file is incomplete")
    return renamed


def _parameter_names(config: dict) -> list[str]:
    """The weight names of the mlx-lm model for `config` (the arrays are never computed)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return [name for name, _ in tree_flatten(model_class(args_class.from_dict(config)).parameters())]


def _config(meta: dict[str, Any], weights: dict[str, mx.array], family: Family, path: Path) -> dict[str, Any]:
    arch = family.arch_name

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    if get("expert_count"):
        raise UserError(f"{path}: mixture-of-experts GGUF models are not supported (expert_count "
                        f"{get('expert_count')}); supported: dense {SUPPORTED_ARCHITECTURES} models")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    if not hidden or not heads or not get("block_count"):
        raise UserError(f"{path}: GGUF metadata lacks {arch}.embedding_length / attention.head_count / "
                        "block_count; the file is incomplete")
    embed = weights.get("token_embd.weight")
    if embed is None:
        raise UserError(f"{path}: no token_embd.weight tensor; the file is incomplete")
    config = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or _rope_head_dim(get, family) or hidden // heads,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 4096),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    config.update(family.read_config(get, config))
    scaling = _rope_scaling(get, weights.pop("rope_freqs.weight", None), config, path)
    if scaling:
        config["rope_scaling"] = scaling
    return config


def _rope_head_dim(get, family: Family) -> int | None:
    """A llama's rotary dimension is its head size (older converters wrote no key_length)."""
    return get("rope.dimension_count") if family.permutes_qk else None


def _rope_scaling(get, freq_factors: mx.array | None, config: dict, path: Path) -> dict | None:
    kind = get("rope.scaling.type")
    if freq_factors is not None:
        return _llama3_scaling(freq_factors, config, path)
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": get("rope.scaling.factor")}
    if kind == "yarn":
        return {"type": "yarn", "factor": get("rope.scaling.factor"),
                "original_max_position_embeddings": get("rope.scaling.original_context_length")}
    raise UserError(f"{path}: RoPE scaling {kind!r} is not supported (supported: linear, yarn, llama3)")


def _llama3_scaling(freq_factors: mx.array, config: dict, path: Path) -> dict:
    """Llama 3.1+ files store the llama3 RoPE scaling as per-frequency divisors; recover its parameters.

    The divisors follow Meta's formula with low/high frequency factors 1 and 4 over an 8192-token original
    context in every released Llama 3.x; the factor is the largest divisor. Anything else is refused.
    """
    factors = np.array(freq_factors.astype(mx.float32))
    params = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    dims = config["head_dim"]
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, dims, 2) / dims)
    wavelen = 2 * np.pi / inv_freq
    orig, low, high, factor = (params["original_max_position_embeddings"], params["low_freq_factor"],
                               params["high_freq_factor"], params["factor"])
    smooth = (orig / wavelen - low) / (high - low)
    expected = np.where(wavelen < orig / high, 1.0,
                        np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-3):
        raise UserError(f"{path}: rope_freqs does not match Llama 3's RoPE scaling; this RoPE variant is "
                        "not supported")
    return params


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """config.json's "quantization": the common bit width, plus per-module entries where it differs."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            bits[module] = weights[f"{module}.weight"].shape[-1] // scales.shape[-1]  # uint32 words per group
    if not bits:
        return {}
    common = Counter(bits.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    for module, b in sorted(bits.items()):
        if b != common:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": b}
    return {"quantization": quantization}
