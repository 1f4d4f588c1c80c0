"""Training / evaluation data: read an mlx-lm-format split, tokenise it once (cached), and mark loss tokens.

Public API (train and eval share it):

    load_split(data_dir, split, tokenizer, train_on, max_seq_length, reporter, cache_dir=None,
               template="tokenizer") -> Split
    rendering_of(split, tokenizer) -> {"format", "template", "train_on"}: how a training split was rendered
                                      (the adapter config keeps it, so eval and generate render alike)

`Split.examples` is a list of `TokenizedExample(tokens, mask)`: `tokens` (int32) are the whole rendered example,
`mask[i]` (bool) says whether token i is a *target* that carries loss (it is predicted from tokens[:i]).
`mask[0]` is always False, padding never exists inside an TokenizedExample, and an example with no loss-bearing
token left after truncation is dropped (and counted).

Record formats (detected per split from the first record, like mlx-lm):
  chat         {"messages": [{"role", "content"}, ...], "tools": [...]?}  rendered by the tokenizer's
               chat template
  completions  {"prompt": ..., "completion": ...}  rendered as a user/assistant chat when the tokenizer has
               a chat template, else as prompt + completion + eos
  text         {"text": ...}  tokenised as is, eos appended
  preference   {"prompt": str or [messages], "chosen": str or [assistant message], "rejected": ...}  two
               examples per record, chosen then rejected, each the prompt plus that reply rendered as a chat;
               only the reply (and its end-of-turn token) carries loss. A pair is kept or dropped whole.

--train-on (auto picks assistant for chat, completions for prompt/completion, all for text):
  all          every token
  completions  the last assistant turn (chat) or the completion, each with its end-of-turn token
  assistant    every assistant turn's content and its end-of-turn token; never system/user/tool text,
               never the template's header before the assistant content, never the separator after
               the end-of-turn token

Masks are computed without knowing the template: for assistant turn i, the text rendering adds
between messages[:i] + generation prompt and messages[:i+1] is the turn (content + end-of-turn). It sits
right after the prefix in the full rendering, or, for templates that re-render earlier turns (Mistral
moves the system prompt to the last user turn), wherever that text is found. The tokens of the full
rendering (HF offsets) that lie inside that span are marked, up to its last special token, so the
separator after the end-of-turn token (e.g. the newline after <|im_end|>) is left out.

`template` (eval renders as the adapter was trained) replaces the tokenizer's chat template: None renders
prompt/completion records as raw prompt + completion + eos (chat records are refused), a Jinja source renders
through that template (lorakit.engine.data.templates, with the tokenizer's bos/eos tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import cache_dir as io_cache_dir
from lorakit.io import iter_jsonl, sha256_file

CACHE_VERSION = 1
TOKENIZER_TEMPLATE = "tokenizer"  # `template`: the tokenizer's own chat template (what training uses)


@dataclass
class TokenizedExample:
    tokens: np.ndarray  # int32, the rendered example
    mask: np.ndarray  # bool, True where the token is a loss target

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def loss_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class Split:
    path: Path
    format: str
    train_on: str
    examples: list[TokenizedExample]
    truncated: int  # examples cut to max_seq_length
    dropped: int  # examples left without any loss token (after truncation)

    @property
    def tokens(self) -> int:
        return sum(e.length for e in self.examples)

    @property
    def loss_tokens(self) -> int:
        return sum(e.loss_tokens for e in self.examples)

    @property
    def records(self) -> int:
        """Records kept: examples, or pairs of them in a preference split."""
        return len(self.examples) // 2 if self.format == "preference" else len(self.examples)

    @property
    def unit(self) -> str:
        return "pairs" if self.format == "preference" else "examples"


def split_path(data_dir: Path, split: str) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data {data_dir}: not a directory; expected one with train.jsonl and valid.jsonl "
                        "(run `lorakit prepare` to make one)")
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"--data {data_dir}: no {split}.jsonl in it (--split takes train, valid or test; "
                        "`lorakit prepare` makes the splits)" if split not in ("train", "valid") else
                        f"--data {data_dir}: no {split}.jsonl in it (run `lorakit prepare` to make the splits)")
    return path


def detect_format(record: dict, where: str) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    raise UserError(f"{where}: expected a 'messages', 'prompt'+'completion', 'prompt'+'chosen'+'rejected' "
                    "or 'text' record, got keys "
                    f"{sorted(record)}; run `lorakit prepare` to convert it")


def resolve_train_on(train_on: str, fmt: str, where: str) -> str:
    if fmt == "preference" and train_on not in ("auto", "completions"):
        raise UserError(f"--train-on {train_on}: {where} holds preference pairs, whose loss is always on the "
                        "chosen and rejected replies; leave --train-on at auto")
    if train_on == "auto":
        return {"chat": "assistant", "completions": "completions", "text": "all",
                "preference": "completions"}[fmt]
    if fmt == "text" and train_on != "all":
        raise UserError(f"--train-on {train_on}: {where} holds plain 'text' records, which have no prompt or "
                        "assistant turns to select; use --train-on all (or auto), or prepare chat data")
    return train_on


def _hf(tokenizer: Any) -> Any:
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _special_ids(tokenizer: Any) -> set[int]:
    hf = _hf(tokenizer)
    ids = set(getattr(tokenizer, "eos_token_ids", None) or []) | set(hf.all_special_ids)
    for token_id, added in getattr(hf, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = _hf(tokenizer)(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(_hf(tokenizer), "chat_template", None))


def render_chat(tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool,
                tools: Any = None) -> str:
    """A chat as text through `template`: TOKENIZER_TEMPLATE (the tokenizer's apply_chat_template) or a Jinja
    source (lorakit's renderer, with the tokenizer's bos/eos tokens, as `lorakit prepare` renders)."""
    if template == TOKENIZER_TEMPLATE:
        kwargs = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    from lorakit.engine.data.templates import render

    special = {k: v for k in ("bos_token", "eos_token") if isinstance(v := getattr(tokenizer, k, None), str)}
    return render(messages, template, add_generation_prompt=generation_prompt, tools=tools or None, **special)


class _Renderer:
    """Tokenises one split's records and computes their loss masks."""

    def __init__(self, tokenizer: Any, fmt: str, train_on: str, path: Path, reporter: Reporter,
                 template: str | None = TOKENIZER_TEMPLATE) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.train_on = train_on
        self.path = path
        self.reporter = reporter
        self.special = _special_ids(tokenizer)
        self.own_template = template == TOKENIZER_TEMPLATE
        # the template to render through (TOKENIZER_TEMPLATE or a Jinja source), None: raw text
        self.template = (TOKENIZER_TEMPLATE if has_chat_template(tokenizer) else None) if self.own_template \
            else template
        self.has_template = self.template is not None
        self.warned_unstable = False

    def render(self, messages: list[dict], tools: Any, generation_prompt: bool) -> str:
        assert self.template is not None
        return render_chat(self.tokenizer, messages, self.template, generation_prompt, tools)

    def examples(self, record: dict, lineno: int) -> list[TokenizedExample]:
        """The record's example, or a preference pair's two (chosen, rejected)."""
        if self.fmt != "preference":
            return [self.example(record, lineno)]
        where = f"{self.path}:{lineno}"
        prompt = record.get("prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
        if isinstance(record.get("system"), str):  # mlx-lm-lora's optional system prompt
            messages = [{"role": "system", "content": record["system"]}, *messages]
        return [self._chat([*messages, {"role": "assistant", "content": _reply_text(record.get(key), key, where)}],
                           record.get("tools"), where) for key in ("chosen", "rejected")]

    def example(self, record: dict, lineno: int) -> TokenizedExample:
        where = f"{self.path}:{lineno}"
        if self.fmt == "text":
            return self._text(record, where)
        if self.fmt == "completions":
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise UserError(f"{where}: 'prompt' and 'completion' must be strings")
            if not self.has_template:
                return self._plain_completion(prompt, completion)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self._chat(messages, record.get("tools"), where)
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m for m in messages):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        return self._chat(messages, record.get("tools"), where)

    def _text(self, record: dict, where: str) -> TokenizedExample:
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise UserError(f"{where}: 'text' must be a non-empty string")
        tokens = list(self.tokenizer.encode(text))
        if tokens[-1] != self.tokenizer.eos_token_id:
            tokens.append(self.tokenizer.eos_token_id)
        return _example(tokens, [True] * len(tokens))

    def _plain_completion(self, prompt: str, completion: str) -> TokenizedExample:
        tokens, offsets = _encode_with_offsets(self.tokenizer, prompt + completion)
        mask = [self.train_on == "all" or start >= len(prompt) for start, _ in offsets]
        return _example(tokens + [self.tokenizer.eos_token_id], mask + [True])

    def _chat(self, messages: list[dict], tools: Any, where: str) -> TokenizedExample:
        if not self.has_template and self.own_template:
            raise UserError(f"{where}: chat records need a chat template, and this tokenizer has none; "
                            "render the data with `lorakit prepare --format text --template NAME`")
        if not self.has_template:
            raise UserError(f"{where}: chat records need a chat template, and prompts are rendered as raw text "
                            "here (--no-chat-template, or an adapter trained on raw text): pass --chat-template "
                            "or --template NAME")
        try:
            full = self.render(messages, tools, generation_prompt=False)
        except Exception as e:  # noqa: BLE001  (jinja raises anything, e.g. on roles that do not alternate)
            raise UserError(f"{where}: the chat template cannot render this conversation: {e}") from None
        tokens, offsets = _encode_with_offsets(self.tokenizer, full)
        if self.train_on == "all":
            return _example(tokens, [True] * len(tokens))
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if self.train_on == "completions":
            turns = turns[-1:]
        if not turns:
            raise UserError(f"{where}: no assistant message to train on (--train-on {self.train_on}); "
                            "add one or use --train-on all")
        mask = [False] * len(tokens)
        for i in turns:
            span = self._turn_span(messages, tools, i, full)
            if span is None:
                continue
            marked = [j for j, (s, e) in enumerate(offsets) if span[0] <= s < span[1] and e <= span[1]]
            # keep up to the turn's end-of-turn token, not the separator the template puts after it
            specials = [j for j in marked if tokens[j] in self.special]
            if specials:
                marked = [j for j in marked if j <= specials[-1]]
            for j in marked:
                mask[j] = True
        return _example(tokens, mask)

    def _turn_span(self, messages: list[dict], tools: Any, i: int, full: str) -> tuple[int, int] | None:
        """Character span of assistant turn i in `full`: what rendering the turn adds after its header."""
        before = self.render(messages[:i], tools, generation_prompt=True) if i else ""
        through = self.render(messages[: i + 1], tools, generation_prompt=False)
        piece = through[_common_prefix(before, through):]
        if full.startswith(before):
            start = len(before)
        else:
            # The template renders earlier turns differently once later ones exist (e.g. Mistral moves
            # the system prompt to the last user turn): find this turn's own text instead.
            start = full.find(piece, _common_prefix(full, before))
            if start < 0:
                if not self.warned_unstable:
                    self.warned_unstable = True
                    self.reporter.warn(f"{self.path}: cannot locate an assistant turn in the rendered chat "
                                       "(the template renders conversation prefixes differently); such turns "
                                       "carry no loss")
                return None
        # the piece may end with text the template adds only at the very end (e.g. a final eos)
        return start, start + _common_prefix(full[start:], piece)


def _reply_text(value: Any, key: str, where: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string or a list ending with an assistant "
                        "message (run `lorakit prepare` to check the pairs)")
    return value


def _example(tokens: list[int], mask: list[bool]) -> TokenizedExample:
    mask_arr = np.array(mask, dtype=bool)
    mask_arr[0] = False  # nothing predicts the first token (and packing relies on it)
    return TokenizedExample(np.array(tokens, dtype=np.int32), mask_arr)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes when the tokenisation or chat template would."""
    hf = _hf(tokenizer)
    h = hashlib.sha256()
    backend = getattr(hf, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(hf.get_vocab().items())).encode())
    h.update(str(getattr(hf, "chat_template", None)).encode())
    h.update(repr(sorted(_special_ids(tokenizer))).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _cache_file(cache_dir: Path, path: Path, tokenizer: Any, train_on: str, max_seq_length: int,
                template: str | None) -> Path:
    parts = [CACHE_VERSION, sha256_file(path), tokenizer_fingerprint(tokenizer), train_on, max_seq_length]
    if template != TOKENIZER_TEMPLATE:  # training's keys stay as they were
        parts.append(template)
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    return Path(cache_dir) / "tokenized" / f"{key}.npz"


def _save_cache(file: Path, split: Split) -> None:
    from lorakit.io import atomic_path

    lengths = np.array([e.length for e in split.examples], dtype=np.int64)
    with atomic_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, lengths=lengths,
                 tokens=np.concatenate([e.tokens for e in split.examples]) if split.examples else
                 np.zeros(0, np.int32),
                 mask=np.concatenate([e.mask for e in split.examples]) if split.examples else
                 np.zeros(0, bool),
                 info=np.array(json.dumps({"format": split.format, "train_on": split.train_on,
                                           "truncated": split.truncated, "dropped": split.dropped})))


def _load_cache(file: Path, path: Path) -> Split | None:
    try:
        with np.load(file) as z:
            info = json.loads(str(z["info"]))
            bounds = np.cumsum(np.concatenate([[0], z["lengths"]]))
            tokens, mask = z["tokens"], z["mask"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is rebuilt
    examples = [TokenizedExample(tokens[a:b], mask[a:b]) for a, b in pairwise(bounds)]
    return Split(path, info["format"], info["train_on"], examples, info["truncated"], info["dropped"])


def load_split(data_dir: Path, split: str, tokenizer: Any, train_on: str, max_seq_length: int,
               reporter: Reporter | None = None, cache_dir: Path | None = None, *,
               template: str | None = TOKENIZER_TEMPLATE) -> Split:
    """Read `data_dir/<split>.jsonl`, tokenise (or reuse the cache), truncate, and compute loss masks.

    `template`: TOKENIZER_TEMPLATE (training's rendering), a Jinja source, or None (raw text); see the module
    docstring."""
    reporter = reporter or Reporter()
    path = split_path(data_dir, split)
    cache_file = _cache_file(cache_dir or io_cache_dir(), path, tokenizer, train_on, max_seq_length, template)
    if cache_file.exists():
        cached = _load_cache(cache_file, path)
        if cached is not None:
            _report(cached, max_seq_length, reporter)
            return cached
    records = list(iter_jsonl(path))
    if not records:
        raise UserError(f"{path}: no records; the {split} split must hold at least one example")
    fmt = detect_format(records[0][1], f"{path}:{records[0][0]}")
    effective = resolve_train_on(train_on, fmt, str(path))
    renderer = _Renderer(tokenizer, fmt, effective, path, reporter, template)
    examples: list[TokenizedExample] = []
    truncated = dropped = 0
    reporter.start(f"tokenising {split}", total=len(records))
    for lineno, record in records:
        if detect_format(record, f"{path}:{lineno}") != fmt:
            raise UserError(f"{path}:{lineno}: record format differs from line {records[0][0]} ({fmt}); "
                            "one split must use one format")
        group = renderer.examples(record, lineno)
        if any(ex.length > max_seq_length for ex in group):
            truncated += 1
            group = [TokenizedExample(ex.tokens[:max_seq_length], ex.mask[:max_seq_length]) for ex in group]
        if any(ex.loss_tokens == 0 for ex in group):
            dropped += 1
        else:
            examples.extend(group)
        reporter.advance(1)
    reporter.finish()
    result = Split(path, fmt, effective, examples, truncated, dropped)
    _save_cache(cache_file, result)
    _report(result, max_seq_length, reporter)
    return result


def _report(split: Split, max_seq_length: int, reporter: Reporter) -> None:
    if split.truncated:
        reporter.warn(f"{split.path}: {split.truncated} of {split.records + split.dropped} {split.unit} are "
                      f"longer than --max-seq-length {max_seq_length} and were truncated")
    if split.dropped:
        reporter.warn(f"{split.path}: {split.dropped} examples have no loss-bearing token "
                      f"(--train-on {split.train_on}) after truncation and were skipped")
    if not split.examples:
        raise UserError(f"{split.path}: no usable examples (all {split.dropped} lack loss-bearing tokens); "
                        "raise --max-seq-length or check --train-on")


def rendering_of(split: Split, tokenizer: Any) -> dict[str, Any]:
    """How a training split was rendered, for the adapter config: {"format", "template", "train_on"}.

    `template` is TOKENIZER_TEMPLATE (the tokenizer's own chat template: chat records, and prompt/completion
    records when the tokenizer has one), the name or Jinja file `lorakit prepare --format text --template`
    rendered chats into this split's text with (its manifest.json says), or None (raw text).
    """
    if split.format == "text":
        template = prepared_template(split.path.parent)
    elif split.format == "completions" and not has_chat_template(tokenizer):
        template = None
    else:
        template = TOKENIZER_TEMPLATE
    return {"format": split.format, "template": template, "train_on": split.train_on}


def prepared_template(data_dir: Path) -> str | None:
    """The template `lorakit prepare --format text` rendered chats with, from the directory's manifest.json;
    None when the text was not rendered from chats (or there is no manifest)."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("output_format") != "text":
        return None
    if set(manifest.get("formats") or {}) <= {"text"}:  # text in, text out: no template touched it
        return None
    template = manifest.get("template")
    return template if isinstance(template, str) and template else None
