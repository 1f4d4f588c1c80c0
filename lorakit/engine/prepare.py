"""`lorakit prepare`: raw JSONL/JSON -> validated, deduplicated, split mlx-lm datasets plus a manifest.

Stages: read (streaming, per record: parse, detect, convert, validate, length, duplicate) -> count tokens
-> split -> cross-split check -> apply the --on-error policy -> write everything into a staging dir and
rename it into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit import __version__
from lorakit.engine.data import split as splitting
from lorakit.engine.data.formats import NormalizedRecord, apply_field_map, convert, detect, parse_field_map
from lorakit.engine.data.templates import BUILTIN_TEMPLATES, FAMILY_TOKENS, get_template, render
from lorakit.engine.data.validate import RecordError
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import (
    check_output_location,
    ensure_new_dir,
    output_lock,
    replace_dir,
    sha256_file,
    staging_dir,
)
from lorakit.settings import PrepareSettings, save_settings, settings_dict

SPLITS = splitting.SPLITS
SHOWN_PROBLEMS = 20
TOKEN_BATCH = 1024


@dataclass
class PrepareResult:
    out: str
    counts: dict[str, int]  # train, valid, test, rejected
    records_read: int
    formats: dict[str, int]
    labels: dict[str, dict[str, int]] | None
    lengths: dict[str, dict[str, float] | None]
    manifest: str


@dataclass
class Item:
    """A record that passed every per-record check."""

    file: str
    line: int
    example: NormalizedRecord
    key: bytes  # identity after whitespace normalisation (duplicates)
    prompt_key: bytes  # the conversation without its final reply (cross-split leaks)
    chars: int
    group: str
    label: str | None = None
    tokens: int | None = None
    rendered: str | None = None
    rejected_tokens: int | None = None  # a preference pair's: `tokens` counts the chosen conversation


@dataclass
class Problem:
    file: str
    line: int
    reason: str
    kind: str  # invalid, duplicate, leak
    record: Any = None
    raw: str | None = None

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"file": self.file, "line": self.line, "reason": self.reason}
        row.update({"record": self.record} if self.record is not None else {"raw": self.raw})
        return row


@dataclass
class Tokenization:
    """What a tokenizer (or a template alone) contributes: the chat template, special tokens, counting."""

    template: str | None = None
    template_name: str | None = None
    special: dict[str, str] = field(default_factory=dict)
    tokenizer: Any = None


def run(settings: PrepareSettings, reporter: Reporter) -> PrepareResult:
    _input_paths(settings)  # a missing input fails before anything is created
    _check_outside_inputs(settings)
    with output_lock(settings.out, "--out"):
        return _prepare(settings, reporter)


def _check_outside_inputs(settings: PrepareSettings) -> None:
    """--out must neither be, contain nor sit inside an input: --overwrite would replace what it reads."""
    inputs = [("INPUT", path) for path in settings.inputs]
    inputs += [("--model", settings.model), ("--tokenizer", settings.tokenizer)]
    if settings.template not in BUILTIN_TEMPLATES:
        inputs.append(("--template", settings.template))
    check_output_location(settings.out, "--out", inputs)


def _prepare(settings: PrepareSettings, reporter: Reporter) -> PrepareResult:
    """Everything from reading to the written output, under --out's lock."""
    out = ensure_new_dir(settings.out, settings.overwrite)
    field_map = parse_field_map(settings.field_map)
    tok = _tokenization(settings, reporter)
    if settings.format == "text" and tok.template is None:
        raise UserError("--format text renders chats through a chat template: pass --template "
                        f"({', '.join(BUILTIN_TEMPLATES)} or a Jinja file), or --model/--tokenizer with one")
    if settings.max_tokens and tok.tokenizer is None:
        raise UserError("--max-tokens needs a tokenizer to count with: pass --model or --tokenizer "
                        "(or use --max-chars)")

    items, problems, read, inputs = _read_all(settings, field_map, reporter)
    _render_and_count(items, problems, settings, tok, reporter)
    items = [it for it in items if it.example is not None]
    _check_one_kind(items, settings)

    assignment = splitting.assign([it.group for it in items], [it.label for it in items], settings.split,
                                  settings.seed)
    if settings.group_by:
        _check_leaks(items, assignment, problems, settings.group_by)
    keep = [i for i, it in enumerate(items) if it.example is not None]
    _apply_policy(problems, read, settings, reporter)
    if not keep:
        first = f", first: {problems[0].file}:{problems[0].line}: {problems[0].reason}" if problems else ""
        raise UserError(f"none of the {read} records is usable ({len(problems)} set aside{first}); "
                        "nothing to write")

    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    for i in keep:
        splits[SPLITS[assignment[i]]].append(items[i])
    for name, members in splits.items():
        # keyed by the file's name, not its path: the same data gives the same files wherever it lies
        members.sort(key=lambda it: splitting.stable_hash(settings.seed, f"{Path(it.file).name}\0{it.line}"))
        if not members and settings.split[SPLITS.index(name)] > 0:
            reporter.warn(f"{name} split is empty ({len(keep)} examples are too few for the ratios "
                          f"{','.join(map(str, settings.split))})")

    manifest = _manifest(settings, inputs, splits, problems, read, tok)
    _write(out, splits, problems, manifest, settings)
    return PrepareResult(
        out=str(out), counts={**{n: len(m) for n, m in splits.items()}, "rejected": len(problems)},
        records_read=read, formats=manifest["formats"], labels=manifest["labels"],
        lengths={**manifest["lengths"],  # and a preference set's chosen_* / rejected_* lengths
                 **{k: v for k, v in (manifest["preference"] or {}).items() if isinstance(v, dict)}},
        manifest=str(out / "manifest.json"),
    )


# ---------------------------------------------------------------- reading


def _read_all(settings: PrepareSettings, field_map: dict[str, str],
              reporter: Reporter) -> tuple[list[Item], list[Problem], int, list[dict[str, Any]]]:
    paths = _input_paths(settings)
    items: list[Item] = []
    problems: list[Problem] = []
    seen: dict[bytes, tuple[str, int]] = {}
    inputs = []
    read = 0
    reporter.start("reading (bytes)", total=sum(p.stat().st_size for p in paths))
    for path in paths:
        name = str(path)
        records = pending = 0
        for line, record, error, raw, size in _records(path):
            read += 1
            records += 1
            pending += size
            if records % 1000 == 0:
                reporter.advance(pending)
                pending = 0
            if error:
                problems.append(Problem(name, line, error, "invalid", raw=raw))
                continue
            try:
                item = _item(name, line, record, settings, field_map)
            except RecordError as e:
                problems.append(Problem(name, line, str(e), "invalid", record=record))
                continue
            if settings.dedupe:
                first = seen.setdefault(item.key, (name, line))
                if first != (name, line):
                    reason = f"duplicate of {first[0]}:{first[1]} (after normalising whitespace)"
                    problems.append(Problem(name, line, reason, "duplicate", record=record))
                    continue
            items.append(item)
        reporter.advance(pending)
        if not records:
            raise UserError(f"{path}: no records in this input file; is it the right file?")
        inputs.append({"path": name, "sha256": sha256_file(path), "records": records})
    reporter.finish()
    return items, problems, read, inputs


def _input_paths(settings: PrepareSettings) -> list[Path]:
    paths = [Path(p) for p in settings.inputs]
    if not paths:
        raise UserError("no input files; pass one or more JSONL/JSON files")
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: input file not found" if not path.exists() else f"{path}: not a file")
    return paths


def _records(path: Path) -> Iterator[tuple[int, dict | None, str | None, str | None, int]]:
    """(line, record, error, raw text, bytes) per record; a bad record gets an error, not an exception."""
    if path.suffix == ".json":
        yield from _json_array(path)
        return
    with open(path, "rb") as f:
        for line, data in enumerate(f, 1):
            if not data.strip():
                continue
            try:
                text = data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield line, None, f"invalid UTF-8 ({e.reason} at byte {e.start})", data.decode(
                    "utf-8", "replace").rstrip("\n"), len(data)
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, None, f"invalid JSON ({e.msg}, column {e.colno})", text, len(data)
                continue
            except RecursionError:
                yield line, None, "JSON nested too deeply to read", text[:200], len(data)
                continue
            if not isinstance(record, dict):
                yield line, None, f"expected a JSON object, got {type(record).__name__}", text, len(data)
                continue
            yield line, record, None, None, len(data)


def _json_array(path: Path) -> Iterator[tuple[int, dict | None, str | None, str | None, int]]:
    """A .json file holding an array of records; each record's line is where it starts."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{lineno}: invalid UTF-8 ({e.reason})") from None
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        raise UserError(f"{path}: a .json input must hold an array of records; use JSONL for one record "
                        "per line")
    pos = _skip(text, pos + 1)
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if isinstance(record, dict):
            yield line, record, None, None, end - pos
        else:
            yield line, None, f"expected a JSON object, got {type(record).__name__}", text[pos:end], end - pos
        pos = _skip(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            raise UserError(f"{path}:{lineno}: invalid JSON (expected ',' or ']' between records)")
    if pos >= len(text):
        raise UserError(f"{path}:{text.count(chr(10)) + 1}: invalid JSON (the array is not closed with ']')")


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _item(name: str, line: int, record: dict[str, Any], settings: PrepareSettings,
          field_map: dict[str, str]) -> Item:
    record = apply_field_map(record, field_map)
    fmt = detect(record) if settings.input_format == "auto" else settings.input_format
    example = convert(record, fmt, settings.system)
    chars = len(example.text) if example.messages is None else sum(len(m.get("content") or "")
                                                                   for m in example.messages)
    key, prompt_key = _keys(example)
    if example.rejected is not None:  # a pair is its prompt, chosen and rejected reply
        key = hashlib.blake2b(key + " ".join(example.rejected.split()).encode(), digest_size=16).digest()
        chars = max(chars, chars - len(example.messages[-1]["content"]) + len(example.rejected))
    if settings.max_chars and chars > settings.max_chars:
        raise RecordError(f"too long: {chars} characters (--max-chars {settings.max_chars})")
    label = None
    if settings.stratify_by:
        label = _field(record, settings.stratify_by, "--stratify-by")
        if settings.stratify_by == "verdict" and example.label is not None:
            label = example.label
    elif example.label is not None:
        label = example.label
    group = _field(record, settings.group_by, "--group-by") if settings.group_by else prompt_key.hex()
    return Item(file=name, line=line, example=example, key=key, prompt_key=prompt_key, chars=chars,
                group=group, label=label)


def _field(record: dict[str, Any], name: str, flag: str) -> str:
    value = record.get(name)
    if value is None or isinstance(value, (dict, list)):
        kind = "" if value is None else "scalar "
        raise RecordError(f"{flag} {name}: the record has no {kind}field '{name}'")
    return str(value)


def _keys(example: NormalizedRecord) -> tuple[bytes, bytes]:
    """(identity, prompt identity): hashes of the example and of all but its final turn, with runs of
    whitespace collapsed; one pass, no quadratic work."""
    h = hashlib.blake2b(digest_size=16)
    if example.messages is None:
        h.update(" ".join(example.text.split()).encode())
        key = h.digest()
        return key, key
    if example.tools:
        h.update(json.dumps(example.tools, sort_keys=True).encode())
    for i, message in enumerate(example.messages):
        if i == len(example.messages) - 1:
            prompt_key = h.digest()
        h.update(b"\x00" + str(message.get("role")).encode() + b"\x01")
        h.update(" ".join((message.get("content") or "").split()).encode())
        if message.get("tool_calls"):
            h.update(json.dumps(message["tool_calls"], sort_keys=True).encode())
    return h.digest(), prompt_key


# ---------------------------------------------------------------- templates and tokens


def _tokenization(settings: PrepareSettings, reporter: Reporter) -> Tokenization:
    tok = Tokenization()
    if settings.model or settings.tokenizer:
        tok.tokenizer = _load_tokenizer(settings, reporter)
        tok.special = {k: v for k in ("bos_token", "eos_token")
                       if isinstance(v := getattr(tok.tokenizer, k, None), str)}
        if getattr(tok.tokenizer, "chat_template", None):
            tok.template, tok.template_name = tok.tokenizer.chat_template, "tokenizer"
    if settings.template:
        tok.template, tok.template_name = get_template(settings.template), settings.template
        if tok.tokenizer is None:
            tok.special = dict(FAMILY_TOKENS.get(settings.template, {}))
    return tok


def _load_tokenizer(settings: PrepareSettings, reporter: Reporter) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lorakit.engine.model.loading import resolve_model_path

    if settings.model:
        flag, given = "--model", settings.model
        path, _ = resolve_model_path(settings.model)
    else:
        flag, given = "--tokenizer", settings.tokenizer
        path = Path(settings.tokenizer).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            from lorakit.engine.export.gguf_import import convert_gguf

            path = convert_gguf(path)
        elif not path.exists():
            raise UserError(f"--tokenizer {given}: not found; give a tokenizer.json, a model directory or a "
                            ".gguf file")
    try:
        if path.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 (transformers raises many types for unreadable tokenizer files)
        raise UserError(f"{flag} {given}: could not load a tokenizer from {path} "
                        f"({type(e).__name__}: {e})") from None
    reporter.log(f"tokenizer: {given}")
    return tokenizer


def _render_and_count(items: list[Item], problems: list[Problem], settings: PrepareSettings,
                      tok: Tokenization, reporter: Reporter) -> None:
    """Render chats through the template (for --format text and for token counts), count tokens, and
    reject over-long examples; a record the template refuses becomes a problem."""
    render_all = settings.format == "text" or (tok.tokenizer is not None and tok.template is not None)
    if not render_all and tok.tokenizer is None:
        return
    bos = tok.special.get("bos_token")
    for item in items:
        ex = item.example
        if ex.messages is None:
            item.rendered = ex.text
        elif render_all:
            try:
                item.rendered = render(ex.messages, tok.template, tools=ex.tools, **tok.special)
            except ValueError as e:
                problems.append(Problem(item.file, item.line, f"{e} (template {tok.template_name})",
                                        "invalid", record=_record_of(ex)))
                item.example = None
                continue
        else:
            item.rendered = "\n".join(m["content"] for m in ex.messages if m.get("content"))
        if settings.format == "text" and ex.messages is not None and bos and item.rendered.startswith(bos):
            # mlx-lm's text dataset tokenizes with encode(), which adds BOS itself
            item.rendered = item.rendered[len(bos):]
    if tok.tokenizer is None:
        return
    live = [it for it in items if it.example is not None]
    reporter.start("counting tokens", total=len(live))
    for start in range(0, len(live), TOKEN_BATCH):
        batch = live[start:start + TOKEN_BATCH]
        ids = tok.tokenizer([it.rendered for it in batch], add_special_tokens=False)["input_ids"]
        _count_rejected(batch, tok)
        for item, row in zip(batch, ids, strict=True):
            item.tokens = len(row)
            longest = max(item.tokens, item.rejected_tokens or 0)
            if settings.max_tokens and longest > settings.max_tokens:
                problems.append(Problem(item.file, item.line, f"too long: {longest} tokens "
                                        f"(--max-tokens {settings.max_tokens})", "invalid",
                                        record=_record_of(item.example)))
                item.example = None
        reporter.advance(len(batch))
    reporter.finish()


def _count_rejected(batch: list[Item], tok: Tokenization) -> None:
    """Tokens of each preference pair's rejected conversation (the longer of the two must fit)."""
    pairs = [it for it in batch if it.example.rejected is not None]
    if not pairs:
        return
    texts = [render(_rejected_messages(it.example), tok.template, tools=it.example.tools, **tok.special)
             if tok.template is not None else "\n".join(m["content"] for m in _rejected_messages(it.example))
             for it in pairs]
    for item, row in zip(pairs, tok.tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True):
        item.rejected_tokens = len(row)


def _rejected_messages(example: NormalizedRecord) -> list[dict[str, Any]]:
    return [*example.messages[:-1], {"role": "assistant", "content": example.rejected}]


def _record_of(example: NormalizedRecord) -> dict[str, Any]:
    if example.rejected is not None:
        return _preference_row(example)
    return {"text": example.text} if example.messages is None else {"messages": example.messages}


def _preference_row(example: NormalizedRecord) -> dict[str, Any]:
    """TRL's conversational preference format: prompt turns, then the chosen and the rejected reply."""
    return {"prompt": example.messages[:-1], "chosen": [example.messages[-1]],
            "rejected": [{"role": "assistant", "content": example.rejected}]}


def _check_one_kind(items: list[Item], settings: PrepareSettings) -> None:
    pair = next((it for it in items if it.example.rejected is not None), None)
    other = next((it for it in items if it.example.rejected is None), None)
    if pair and settings.format == "text":
        raise UserError(f"{pair.file}:{pair.line}: a preference pair (chosen/rejected) cannot be rendered as "
                        "one text; drop --format text")
    if pair and other:
        raise UserError(f"the inputs mix preference pairs ({pair.file}:{pair.line}) with other records "
                        f"({other.file}:{other.line}); prepare them separately")
    if settings.format == "text":
        return
    text = next((it for it in items if it.example.messages is None), None)
    chat = next((it for it in items if it.example.messages is not None), None)
    if text and chat:
        raise UserError(f"the inputs mix plain-text records ({text.file}:{text.line}) with chat records "
                        f"({chat.file}:{chat.line}); an mlx-lm dataset holds one kind. Pass --format text "
                        "(with --template) to render the chats as text, or prepare them separately")


# ---------------------------------------------------------------- split checks and error policy


def _check_leaks(items: list[Item], assignment: list[int], problems: list[Problem],
                 settings_flag: str) -> None:
    """With --group-by, the same prompt can land in two splits; keep it where it was seen first (train
    before valid before test) and report the others."""
    home: dict[bytes, int] = {}
    for i in sorted(range(len(items)), key=lambda i: (assignment[i], i)):
        item = items[i]
        first = home.setdefault(item.prompt_key, i)
        if assignment[first] != assignment[i]:
            other = items[first]
            reason = (f"same prompt as {other.file}:{other.line}, but that one is in "
                      f"{SPLITS[assignment[first]]} and this one in {SPLITS[assignment[i]]} "
                      f"(--group-by {settings_flag} put them in different groups)")
            problems.append(Problem(item.file, item.line, reason, "leak", record=_record_of(item.example)))
            item.example = None


def _apply_policy(problems: list[Problem], read: int, settings: PrepareSettings, reporter: Reporter) -> None:
    if not problems:
        return
    problems.sort(key=lambda p: (p.file, p.line))
    invalid = sum(p.kind == "invalid" for p in problems)
    listing = "\n  ".join(f"{p.file}:{p.line}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    if settings.on_error == "fail":
        raise UserError(f"{len(problems)} bad record(s) of {read}:\n  {listing}{more}\nFix them, or pass "
                        "--on-error skip to set them aside in rejected.jsonl"
                        + (" (or --no-dedupe to keep duplicates)"
                           if any(p.kind == "duplicate" for p in problems) else ""))
    rate = invalid / max(read, 1)
    if rate > settings.max_error_rate:
        raise UserError(f"{invalid} of {read} records ({rate:.1%}) are invalid, more than --max-error-rate "
                        f"{settings.max_error_rate:g}; is --input-format or --field-map right?"
                        f"\n  {listing}{more}")
    reporter.warn(f"set aside {len(problems)} record(s) in rejected.jsonl ({invalid} invalid, "
                  f"{len(problems) - invalid} duplicate or shared between splits); first: "
                  f"{problems[0].file}:{problems[0].line}: {problems[0].reason}")


# ---------------------------------------------------------------- outputs


def _row(item: Item, settings: PrepareSettings) -> dict[str, Any]:
    ex = item.example
    row: dict[str, Any]
    if ex.rejected is not None:
        return _preference_row(ex)
    if settings.format == "text":
        row = {"text": item.rendered}
    elif ex.messages is None:
        row = {"text": ex.text}
    else:
        row = {"messages": ex.messages}
        if ex.tools:
            row["tools"] = ex.tools
    if ex.extra:
        row.update(ex.extra)
    return row


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)

    def pct(p: float) -> int:
        return values[max(0, math.ceil(p * len(values)) - 1)]

    return {"min": values[0], "mean": round(sum(values) / len(values), 1), "p50": pct(0.5), "p95": pct(0.95),
            "max": values[-1]}


def _preference_stats(kept: list[Item]) -> dict[str, Any] | None:
    """Lengths of the chosen and the rejected replies (characters, and tokens of the whole conversation),
    so a set whose chosen answers are simply longer shows it."""
    pairs = [it for it in kept if it.example.rejected is not None]
    if not pairs:
        return None
    counted = [it for it in pairs if it.rejected_tokens is not None]
    return {
        "chosen_chars": _stats([len(it.example.messages[-1]["content"]) for it in pairs]),
        "rejected_chars": _stats([len(it.example.rejected) for it in pairs]),
        "chosen_longer": round(sum(len(it.example.messages[-1]["content"]) > len(it.example.rejected)
                                   for it in pairs) / len(pairs), 4),
        "chosen_tokens": _stats([it.tokens for it in counted]) if counted else None,
        "rejected_tokens": _stats([it.rejected_tokens for it in counted]) if counted else None,
    }


def _manifest(settings: PrepareSettings, inputs: list[dict[str, Any]], splits: dict[str, list[Item]],
              problems: list[Problem], read: int, tok: Tokenization) -> dict[str, Any]:
    kept = [it for members in splits.values() for it in members]
    labelled = any(it.label is not None for it in kept)
    tokens = [it.tokens for it in kept if it.tokens is not None]
    return {
        "lorakit_version": __version__,
        "inputs": inputs,
        "records_read": read,
        "output_format": settings.format,
        "counts": {**{n: len(m) for n, m in splits.items()}, "rejected": len(problems)},
        "rejected": dict(sorted(Counter(p.kind for p in problems).items())),
        "formats": dict(sorted(Counter(it.example.fmt for it in kept).items())),
        "label_field": (settings.stratify_by or "verdict") if labelled else None,
        "labels": {n: dict(sorted(Counter(str(it.label) for it in m).items())) for n, m in splits.items()}
        if labelled else None,
        "lengths": {"chars": _stats([it.chars for it in kept]), "tokens": _stats(tokens) if tokens else None},
        "preference": _preference_stats(kept),
        "template": tok.template_name,
        "tokenizer": settings.model or settings.tokenizer,
        "settings": settings_dict(settings),
    }


def _write(out: Path, splits: dict[str, list[Item]], problems: list[Problem], manifest: dict[str, Any],
           settings: PrepareSettings) -> None:
    staging = staging_dir(out)
    try:
        for name, members in splits.items():
            _jsonl(staging / f"{name}.jsonl", (_row(it, settings) for it in members))
        if problems:
            _jsonl(staging / "rejected.jsonl", (p.row() for p in problems))
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(staging.glob("*.jsonl"))}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        save_settings(settings, staging / "lorakit.yaml")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    # The whole directory is renamed into place at the end, so plain writes are atomic enough here.
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
