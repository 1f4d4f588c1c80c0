"""Rebuild a Hugging Face `tokenizers` tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.

Two vocabulary kinds, as llama.cpp names them in `tokenizer.ggml.model`:
- "gpt2": byte-level BPE (vocab + merges) with a pre-tokenizer regex picked by `tokenizer.ggml.pre`
  (Llama 3, SmolLM, Qwen2, ...);
- "llama": SentencePiece BPE (vocab + scores, byte fallback, optional space prefix) as in Llama 2,
  Mistral, TinyLlama.
Token types mark control tokens (special), user-defined tokens (added, matched whole), unknown and byte tokens.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lorakit.errors import UserError

# llama.cpp token types (gguf.TokenType)
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, applied in order (llama-vocab.cpp)
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "llama-v3": [LLAMA3_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT],
    "dbrx": [LLAMA3_SPLIT],
    "falcon3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
}
# Pre-tokenizers whose whole-word vocabulary hits skip the merges (llama.cpp's `ignore_merges`).
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}


def build_tokenizer(meta: dict[str, Any], source: str, warn) -> tuple[Tokenizer, dict[str, Any]]:
    """Return the tokenizer and the tokenizer_config.json fields (special tokens, add_bos/eos, chat template)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata; this file carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, warn)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies without the flag
    else:
        raise UserError(f"{source}: tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE) "
                        "and 'llama' (SentencePiece BPE)")

    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN) and t in vocab])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab])

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
                        + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tokens.index(t)) for t in used])

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], warn) -> Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise UserError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        warn(f"GGUF pre-tokenizer {pre!r} is not known to lorakit; splitting text like GPT-2 "
             f"(known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}). Token ids may differ from llama.cpp's.")
    splits = PRE_TOKENIZER_SPLITS.get(pre, [GPT2_SPLIT])
    # A byte-level vocabulary is spelled in the 256-character byte alphabet; respell any token that is not.
    byte_char = _byte_alphabet()
    alphabet = set(byte_char)
    tokenizer = Tokenizer(models.BPE(
        vocab={t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode()): i
               for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=pre in IGNORE_MERGES,
    ))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte value)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise UserError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.scores nor merges")
        merges = _merges_from_scores(tokens, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    add_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a token into two vocabulary pieces, best token score first."""
    merges = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
