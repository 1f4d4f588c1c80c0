"""`lorakit fuse --export-gguf`: the fused float model as a GGUF file for llama.cpp.

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes these families (see
gguf_families for what differs per family): tensor names from gguf's own name map, norms and biases in
float32, the matrices in the chosen type from `gguf.quants`, and the tokenizer (tokens, token types, merges,
special ids, add_bos, chat template) as `tokenizer.ggml.*` metadata.

K-quants (Q4_K_M, Q5_K_M, Q6_K) are not offered: the `gguf` package can read them but has no quantizer for
them; llama.cpp's `llama-quantize` turns an f16 export into any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import mlx.core as mx
import numpy as np

from lorakit.engine.export.gguf_encode import TENSOR_TYPES, encode_matrix
from lorakit.engine.export.gguf_families import (
    BY_MODEL_TYPE,
    Family,
    gemma2_attention_scalar,
    gguf_name,
    head_dim,
    name_map,
    to_gguf_layout,
)
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError

if TYPE_CHECKING:
    from lorakit.engine.export.gguf_check import GgufCheck

SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)
@dataclass
class GgufExport:
    path: str
    type: str
    size_bytes: int
    tensors: int
    tokenizer_model: str
    tokenizer_pre: str | None
    check: GgufCheck | None = None  # the file read back and run (fuse --verify)
    modelfile: str | None = None  # the Ollama Modelfile written beside it


def check_exportable(config: dict) -> Family:
    """Fail early (before any fusing) on a model llama.cpp's architectures cannot describe; return its family."""
    model_type = config.get("model_type")
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UserError(f"--export-gguf: model type '{model_type}' is not supported (supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}). Drop --export-gguf, or convert the fused "
                        "directory with llama.cpp's convert_hf_to_gguf.py.")
    scaling = config.get("rope_scaling")
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if scaling and not (kind == "linear" and family.permutes_qk):
        raise UserError(f"--export-gguf: rope_scaling type '{kind}' is not supported for {model_type} (only "
                        "linear, for llama-family models). Convert the fused directory with llama.cpp's "
                        "convert_hf_to_gguf.py instead.")
    if model_type == "gemma2" and config.get("query_pre_attn_scalar", head_dim(config)) \
            != gemma2_attention_scalar({**config, "head_dim": head_dim(config)}):
        raise UserError("--export-gguf: this Gemma 2's query_pre_attn_scalar differs from the one llama.cpp "
                        "derives from its shape; llama.cpp would compute other attention scores")
    return family


def export_gguf(weights: dict[str, mx.array], config: dict, tokenizer_dir: Path, path: Path, gguf_type: str,
                name: str, reporter: Reporter | None = None) -> GgufExport:
    """Write `weights` (float, Hugging Face names and q/k row order) and the tokenizer in `tokenizer_dir`."""
    reporter = reporter or Reporter()
    family = check_exportable(config)
    file_type, matrix_type = TENSOR_TYPES[gguf_type]
    vocab_size = weights["model.embed_tokens.weight"].shape[0]

    writer = gguf.GGUFWriter(str(path), family.arch_name)
    writer.add_name(name)
    _add_hparams(writer, config, vocab_size)
    family.write_hparams(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer_model, pre = _add_tokenizer(writer, Path(tokenizer_dir), vocab_size, reporter)

    names = name_map(family, config)
    reporter.start("gguf", total=len(weights))
    for key, value in weights.items():
        target = gguf_name(names, key)
        if target is None:
            raise UserError(f"--export-gguf: tensor '{key}' has no llama.cpp name for a {config['model_type']} "
                            "model")
        data = np.array(to_gguf_layout(family, key, value, config).astype(mx.float32))
        if data.ndim == 1:  # norms and biases stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(target, data)
        else:
            encoded, tensor_type = encode_matrix(target, data, matrix_type)
            writer.add_tensor(target, encoded, raw_dtype=tensor_type)
        reporter.advance()
    reporter.finish()

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufExport(path=str(path), type=gguf_type, size_bytes=Path(path).stat().st_size,
                      tensors=len(weights), tokenizer_model=tokenizer_model, tokenizer_pre=pre)


def _add_hparams(writer: gguf.GGUFWriter, config: dict, vocab_size: int) -> None:
    """The hyperparameters every family writes (convert_hf_to_gguf.py's TextModel.set_gguf_parameters)."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(float(config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(vocab_size)


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
    if "bos" not in special.add_special_token:
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
