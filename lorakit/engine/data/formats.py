"""Input record formats: detect each record's format and convert it to one chat (or plain-text) example."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.engine.data.validate import RecordError, check_conversation, check_text
from lorakit.engine.data.verdicts import parse_verdict
from lorakit.errors import UserError

FORMATS = ("chat", "sharegpt", "completions", "alpaca", "text", "judge", "preference")

# Fields --field-map may rename (canonical name = input name). Message-level ones apply inside message lists.
RECORD_FIELDS = ("messages", "system", "tools", "conversations", "prompt", "completion", "instruction", "input",
                 "output", "text", "question", "answer_a", "answer_b", "reasoning", "verdict", "chosen",
                 "rejected")
MESSAGE_FIELDS = ("role", "content", "from", "value")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}

JUDGE_PROMPT = (
    "Compare the two answers to the question below. Explain which answer is better and why, then give your "
    "verdict on the last line as 'Verdict: A', 'Verdict: B' or 'Verdict: tie'.\n\n"
    "Question:\n{question}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}"
)


@dataclass
class NormalizedRecord:
    """One converted record: chat messages (with optional tools), or plain text."""

    fmt: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[Any] | None = None
    label: str | None = None  # a judge record's verdict
    extra: dict[str, Any] | None = None  # fields carried into the output row (a judge record's originals)
    rejected: str | None = None  # a preference pair's rejected reply; `messages` ends with the chosen one


def parse_field_map(items: list[str]) -> dict[str, str]:
    """'prompt=question' means: read the prompt from the input field 'question'."""
    mapping: dict[str, str] = {}
    for item in items:
        canonical, sep, source = (part.strip() for part in item.partition("="))
        if not sep or not canonical or not source:
            raise UserError(f"--field-map '{item}': expected FIELD=INPUT_FIELD, e.g. prompt=question")
        if canonical not in RECORD_FIELDS + MESSAGE_FIELDS:
            raise UserError(f"--field-map '{item}': unknown field '{canonical}'; "
                              f"use one of: {', '.join(RECORD_FIELDS + MESSAGE_FIELDS)}")
        mapping[canonical] = source
    return mapping


def apply_field_map(record: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    if not mapping:
        return record
    record = dict(record)
    for canonical, source in mapping.items():
        if canonical in RECORD_FIELDS and source in record:
            record[canonical] = record.pop(source)
    inner = {c: s for c, s in mapping.items() if c in MESSAGE_FIELDS}
    if inner:
        for key in ("messages", "conversations"):
            turns = record.get(key)
            if isinstance(turns, list):
                record[key] = [_rename(t, inner) if isinstance(t, dict) else t for t in turns]
    return record


def _rename(turn: dict[str, Any], inner: dict[str, str]) -> dict[str, Any]:
    turn = dict(turn)
    for canonical, source in inner.items():
        if source in turn:
            turn[canonical] = turn.pop(source)
    return turn


def detect(record: dict[str, Any]) -> str:
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "question" in record and "answer_a" in record and "answer_b" in record:
        return "judge"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    fields = ", ".join(sorted(map(str, record))) or "none"
    raise RecordError(f"unknown record format (fields: {fields}); expected messages, conversations, "
                      "prompt+completion, instruction+output, text, question+answer_a+answer_b, or "
                      "prompt+chosen+rejected "
                      "(rename fields with --field-map)")


def convert(record: dict[str, Any], fmt: str, system: str | None = None) -> NormalizedRecord:
    """Convert one record of format `fmt`; RecordError says what is wrong with it."""
    if fmt == "text":
        text = _string(record, "text")
        check_text(text)
        return NormalizedRecord(fmt=fmt, text=text)
    example = _CONVERTERS[fmt](record)
    if system is not None and example.messages[0].get("role") != "system":
        example.messages.insert(0, {"role": "system", "content": system})
    check_conversation(example.messages)
    return example


def judge_messages(question: str, answer_a: str, answer_b: str, reasoning: str | None = None,
                   verdict: str | None = None) -> list[dict[str, str]]:
    """The chat a judge record becomes (without the assistant turn when verdict is None)."""
    messages = [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer_a=answer_a,
                                                                answer_b=answer_b)}]
    if verdict is not None:
        answer = f"{reasoning.strip()}\n\nVerdict: {verdict}" if reasoning else f"Verdict: {verdict}"
        messages.append({"role": "assistant", "content": answer})
    return messages


def _chat(record: dict[str, Any]) -> NormalizedRecord:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"'messages' must be a non-empty list of {{role, content}} objects, "
                          f"got {_type(messages)}")
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RecordError(f"'tools' must be a list of tool definitions, got {_type(tools)}")
    if record.get("system") is not None:
        system = _string(record, "system")
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise RecordError("both a 'system' field and a leading system message; keep one")
        messages.insert(0, {"role": "system", "content": system})
    return NormalizedRecord(fmt="chat", messages=messages, tools=tools or None)


def _sharegpt(record: dict[str, Any]) -> NormalizedRecord:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"'conversations' must be a non-empty list of {{from, value}} objects, got {_type(turns)}")
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _string(record, "system")})
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{i}] must be an object with 'from' and 'value', got {_type(turn)}")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"conversations[{i}]: unknown speaker {speaker!r} "
                              f"(expected {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return NormalizedRecord(fmt="sharegpt", messages=messages)


def _completions(record: dict[str, Any]) -> NormalizedRecord:
    return NormalizedRecord(fmt="completions", messages=[{"role": "user", "content": _string(record, "prompt")},
                                                {"role": "assistant", "content": _string(record, "completion")}])


def _alpaca(record: dict[str, Any]) -> NormalizedRecord:
    instruction = _string(record, "instruction")
    extra_input = _string(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    return NormalizedRecord(fmt="alpaca", messages=[{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": _string(record, "output")}])


def _judge(record: dict[str, Any]) -> NormalizedRecord:
    question, answer_a, answer_b = (_string(record, k) for k in ("question", "answer_a", "answer_b"))
    reasoning = _string(record, "reasoning", required=False)
    raw = record.get("verdict")
    verdict = parse_verdict(raw)
    if verdict is None:
        raise RecordError(f"'verdict' must be A, B or tie, got {raw!r}")
    extra = {"question": question, "answer_a": answer_a, "answer_b": answer_b, "reasoning": reasoning,
             "verdict": verdict}
    return NormalizedRecord(fmt="judge", messages=judge_messages(question, answer_a, answer_b, reasoning, verdict),
                            label=verdict, extra={k: v for k, v in extra.items() if v is not None})


def _preference(record: dict[str, Any]) -> NormalizedRecord:
    """TRL's and mlx-lm-lora's preference records: a prompt (string, or `prompt`/`messages` as a message
    list) and a chosen and a rejected reply (strings, or lists ending with the assistant message)."""
    prompt = record.get("prompt", record.get("messages"))
    if prompt is None:
        raise RecordError("missing field 'prompt' (a string or a list of messages before the replies)")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _string(record, "prompt")}]
    elif isinstance(prompt, list) and prompt:
        messages = [dict(m) if isinstance(m, dict) else m for m in prompt]
    else:
        raise RecordError(f"'prompt' must be a string or a non-empty list of messages, got {_type(prompt)}")
    if record.get("system") is not None:
        messages.insert(0, {"role": "system", "content": _string(record, "system")})
    chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise RecordError("'chosen' and 'rejected' are the same reply; a pair needs two different answers")
    return NormalizedRecord(fmt="preference", messages=[*messages, {"role": "assistant", "content": chosen}],
                            rejected=rejected)


def _reply(record: dict[str, Any], key: str) -> str:
    """A preference reply's text: a string, or the content of the last message of a list."""
    value = record.get(key)
    if isinstance(value, list):
        last = value[-1] if value else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise RecordError(f"'{key}' must be a string or a list of messages ending with an assistant one")
        value = last.get("content")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"'{key}': the assistant message's content is empty or not a string")
        return value
    return _string(record, key)


_CONVERTERS = {"chat": _chat, "sharegpt": _sharegpt, "completions": _completions, "alpaca": _alpaca,
               "judge": _judge, "preference": _preference}


def _string(record: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing field '{key}'")
        return None
    if not isinstance(value, str):
        raise RecordError(f"'{key}' must be a string, got {_type(value)}")
    if required and not value.strip():
        raise RecordError(f"'{key}' is empty or whitespace-only")
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
