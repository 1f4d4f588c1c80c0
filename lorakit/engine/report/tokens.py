"""The token view: a few training examples as the run tokenised them, each token marked by whether it carries
loss (the mask `lorakit train` computes from --train-on; lorakit.engine.data.tokenized).

The examples are tokenised by `load_split` itself, from a copy of the first records of train.jsonl, with the
run's model tokenizer, --train-on and --max-seq-length. The tokenizer is only loaded when it is on this machine
(a local model directory or .gguf file, or a hub id already in the Hugging Face cache): nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.engine.reporter import Reporter
from lorakit.errors import LorakitError

MAX_TOKENS = 1024  # shown per example


@dataclass
class Token:
    text: str
    loss: bool
    special: bool
    ids: list[int]


@dataclass
class TokenExample:
    line: int
    tokens: list[Token]
    total: int  # tokens in the example (the view may show fewer)
    loss_tokens: int


@dataclass
class TokenView:
    run: str
    model: str
    data: str
    train_on: str
    format: str
    examples: list[TokenExample]


class Unavailable(Exception):
    """The view cannot be built here (the note says why)."""


def local_model(model: str, revision: str | None, beside: Path) -> Path:
    """The model's directory (or .gguf file) on this machine, without any download."""
    from lorakit.engine.report.gather import recorded_path

    found = recorded_path(model, beside)
    if found is not None:
        return found
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise Unavailable(f"the model {model} is not on this machine")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or no such repo): either way, nothing here
        raise Unavailable(f"the model {model} is not in the Hugging Face cache (the report never downloads)")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer as training loads it (mlx-lm's wrapper); a .gguf is converted (cached) first."""
    from lorakit.engine.model.loading import resolve_model_path

    try:
        directory, _ = resolve_model_path(str(path))
        from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return mlx_load_tokenizer(directory, eos_token_ids=config.get("eos_token_id"))
    except (LorakitError, OSError, ValueError) as e:
        raise Unavailable(f"could not load the tokenizer of {path} ({e})") from None


def pieces(hf: Any, ids: list[int]) -> list[tuple[str, int, int]]:
    """(text, first, end) per displayed token: each token's text as it appears in the decoded sequence (a
    few tokens of left context keep leading spaces right); tokens that only together make a character are
    shown as one."""
    def decode(part: list[int]) -> str:
        return hf.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out, start = [], 0
    for i in range(len(ids)):
        left = max(0, start - 3)
        before, text = decode(ids[left:start]), decode(ids[left:i + 1])
        if text.endswith("\ufffd") and i + 1 - start < 4 and i + 1 < len(ids):
            continue  # part of a multi-byte character: wait for the rest
        piece = text[len(before):] if text.startswith(before) else decode(ids[start:i + 1])
        out.append((piece, start, i + 1))
        start = i + 1
    return out


def _example(hf: Any, special: set[int], tokens: list[int], mask: list[bool], line: int) -> TokenExample:
    shown = tokens[:MAX_TOKENS]
    view = [Token(text, any(mask[a:b]), any(t in special for t in shown[a:b]), shown[a:b])
            for text, a, b in pieces(hf, shown)]
    return TokenExample(line, view, len(tokens), int(sum(mask)))


def token_view(run: Any, data: Path, count: int) -> TokenView:
    """The first `count` training examples of `run` (a gather.RunInfo) as the run tokenised them."""
    from lorakit.engine.data.tokenized import load_split

    settings = run.settings
    model = settings.get("model")
    if not model:
        raise Unavailable(f"{run.path}/lorakit.yaml names no model")
    tokenizer = load_tokenizer(local_model(str(model), settings.get("revision"), run.path.parent))
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    special = set(getattr(hf, "all_special_ids", []) or [])
    train_on, max_len = str(settings.get("train_on", "auto")), int(settings.get("max_seq_length", 2048))
    with tempfile.TemporaryDirectory(prefix="lorakit-report-") as tmp:
        lines = _first_records(data / "train.jsonl", count)
        Path(tmp, "train.jsonl").write_text("".join(text for _, text in lines), encoding="utf-8")
        try:
            split = load_split(Path(tmp), "train", tokenizer, train_on, max_len, Reporter(),
                               cache_dir=Path(tmp) / "cache")
        except LorakitError as e:
            raise Unavailable(f"could not tokenise {data / 'train.jsonl'} as the run did ({e})") from None
    numbers = [line for line, _ in lines] if not split.dropped else [0] * len(split.examples)  # 0: unknown
    examples = [_example(hf, special, [int(t) for t in ex.tokens], [bool(m) for m in ex.mask], line)
                for ex, line in zip(split.examples, numbers)]
    return TokenView(run.name, str(model), str(data), split.train_on, split.format, examples)


def _first_records(path: Path, count: int) -> list[tuple[int, str]]:
    """(line number, line) of the first `count` non-blank lines."""
    found: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(found) >= count:
                break
            if line.strip():
                found.append((number, line if line.endswith("\n") else line + "\n"))
    return found
