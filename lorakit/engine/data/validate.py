"""The rules every converted example must pass; a broken rule is a RecordError naming what to fix."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """One record is unusable; the message is the reason shown with its file and line."""


def check_text(text: str) -> None:
    if not text.strip():
        raise RecordError("'text' is empty or whitespace-only")


def check_conversation(messages: list[Any]) -> None:
    """Roles known, contents non-empty strings, system first only, turns alternate, assistant last."""
    previous = None
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise RecordError(f"message {i} must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"message {i}: unknown role {role!r} (expected {', '.join(ROLES)})")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            content = "-"  # a pure tool call has no text
        if not isinstance(content, str):
            raise RecordError(f"message {i} ({role}): 'content' must be a string, got "
                              f"{'null' if content is None else type(content).__name__}")
        if not content.strip():
            raise RecordError(f"message {i} ({role}): empty or whitespace-only content")
        if role == "system" and i != 1:
            raise RecordError(f"message {i}: a system message may only come first")
        if role == previous and role != "tool":
            raise RecordError(f"messages {i - 1} and {i}: two {role} turns in a row; merge them or add the "
                              "missing turn between them")
        previous = role
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("no user turn")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"the conversation ends with a {messages[-1]['role']} turn; it must end with an "
                          "assistant turn (drop the trailing turn or add the reply)")
