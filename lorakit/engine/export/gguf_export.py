"""`lorakit fuse --export-gguf`: the fused float model as a GGUF file for llama.cpp (llama family).

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes a llama: tensor names from
gguf's own name map, q/k rows permuted for llama.cpp's RoPE kernel, norms in float32, the other matrices in
f16 or q8_0, and the tokenizer (tokens, token types, merges, special ids, add_bos, chat template) as
`tokenizer.ggml.*` metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from lorakit.engine.export.hf_export import permute_rows, qk_heads
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama",)
TENSOR_TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass
class GgufExport:
    path: str
    type: str
    size_bytes: int
    tensors: int
    tokenizer_model: str
    tokenizer_pre: str | None


def check_exportable(config: dict) -> None:
    """Fail early (before any fusing) on a model llama.cpp's llama architecture cannot describe."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"--export-gguf: model type '{model_type}' is not supported (supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}). Drop --export-gguf, or convert the fused "
                        "directory with llama.cpp's convert_hf_to_gguf.py.")
    scaling = config.get("rope_scaling")
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if scaling and kind != "linear":
        raise UserError(f"--export-gguf: rope_scaling type '{kind}' is not supported (only linear). Convert "
                        "the fused directory with llama.cpp's convert_hf_to_gguf.py instead.")


def export_gguf(weights: dict[str, mx.array], config: dict, tokenizer_dir: Path, path: Path, gguf_type: str,
                name: str, reporter: Reporter | None = None) -> GgufExport:
    """Write `weights` (float, Hugging Face names and q/k row order) and the tokenizer in `tokenizer_dir`."""
    reporter = reporter or Reporter()
    check_exportable(config)
    file_type, matrix_type = TENSOR_TYPES[gguf_type]
    vocab_size = weights["model.embed_tokens.weight"].shape[0]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    _add_hparams(writer, config, vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_model, pre = _add_tokenizer(writer, Path(tokenizer_dir), vocab_size, reporter)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    reporter.start("gguf", total=len(weights))
    for key, value in weights.items():
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--export-gguf: tensor '{key}' has no llama.cpp name; is this a llama model?")
        heads = qk_heads(key, config)
        if heads:
            value = permute_rows(value, heads)
        data = np.array(value.astype(mx.float32))
        if data.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(gguf_name, data)
        else:
            encoded, tensor_type = _encode(data, matrix_type)
            writer.add_tensor(gguf_name, encoded, raw_dtype=tensor_type)
        reporter.advance()
    reporter.finish()

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufExport(path=str(path), type=gguf_type, size_bytes=Path(path).stat().st_size,
                      tensors=len(weights), tokenizer_model=tokenizer_model, tokenizer_pre=pre)


def _encode(data: np.ndarray,
            qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Quantize one matrix; rows q8_0 cannot split into blocks fall back to f16 (as llama.cpp does)."""
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _add_hparams(writer: gguf.GGUFWriter, config: dict, vocab_size: int) -> None:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(vocab_size)
    scaling = config.get("rope_scaling")
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _add_tokenizer(writer: gguf.GGUFWriter, directory: Path, vocab_size: int,
                   reporter: Reporter) -> tuple[str, str | None]:
    """Tokenizer metadata, from the fused directory's tokenizer files. Returns (model, pre-tokenizer)."""
    tokenizer_json = directory / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.exists() else {}
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and not model.get("byte_fallback") \
            and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        kind, pre = "gpt2", _pre_tokenizer_name(spec.get("pre_tokenizer"), reporter)
        tokens, types = _byte_level_tokens(tokenizer_json, vocab_size)
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    elif (directory / "tokenizer.model").exists():
        kind, pre = "llama", "default"
        vocab = gguf.SentencePieceVocab(directory)
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        for i in range(len(tokens), vocab_size):  # embedding rows past the vocabulary
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        raise UserError(f"--export-gguf: the tokenizer in {directory} is neither a byte-level BPE "
                        "tokenizer.json nor a SentencePiece tokenizer.model; llama.cpp cannot use it")
    special = gguf.SpecialVocab(directory, load_merges=kind == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if "add_bos" not in special.add_special_token:
        writer.add_add_bos_token(False)  # say it: llama.cpp otherwise guesses per tokenizer kind
    return kind, pre


def _byte_level_tokens(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type, as convert_hf_to_gguf.py's get_vocab_base lists them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(pre_tokenizer: dict | None, reporter: Reporter) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for the splitting regexes of a byte-level tokenizer.json."""
    from lorakit.engine.export.gguf_tokenizer import GPT2_SPLIT, PRE_TOKENIZER_SPLITS

    steps = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer else [])
    splits = []
    for step in steps:
        if step.get("type") == "Split":
            splits.append((step.get("pattern") or {}).get("Regex"))
        elif step.get("type") == "Digits" and step.get("individual_digits"):
            splits.append(r"\p{N}")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            splits.append(GPT2_SPLIT)
    for name, known in PRE_TOKENIZER_SPLITS.items():
        if name != "default" and known == splits:
            return name
    reporter.warn("--export-gguf: the tokenizer's pre-tokenizer matches no name llama.cpp knows; writing "
                  "'default' (llama.cpp may split text differently than the model was trained on)")
    return "default"
