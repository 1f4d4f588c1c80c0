"""Pairwise judge records for `lorakit eval --judge`: read them from a split and build both prompts.

A split written by `lorakit prepare` from judge records keeps the raw fields (`question`, `answer_a`,
`answer_b`, `reasoning`, `verdict`) next to the `messages` it trains on; a raw judge JSONL works too.

The default prompt is `lorakit.engine.data.formats.judge_messages`, the very function prepare uses, so eval asks
exactly what training taught. `--judge-template FILE` replaces the user message's wording with a Jinja
template over `question`, `answer_a` and `answer_b` (keep it equal to what the adapter was trained on).
A system message at the start of the record's `messages` (prepare --system) is kept in both orders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorakit.engine.data.formats import judge_messages
from lorakit.engine.data.verdicts import parse_verdict
from lorakit.errors import UserError

FIELDS = ("question", "answer_a", "answer_b")


@dataclass
class JudgeItem:
    line: int
    question: str
    answer_a: str
    answer_b: str
    verdict: str  # A, B or tie
    system: str | None = None

    def swapped(self) -> JudgeItem:
        """The same question with the answers in each other's place (the verdict flips with them)."""
        flipped = {"A": "B", "B": "A", "tie": "tie"}[self.verdict]
        return JudgeItem(self.line, self.question, self.answer_b, self.answer_a, flipped, self.system)


def judge_item(record: dict, line: int, path: Path) -> JudgeItem:
    """The judge fields of one split record; a missing or malformed one is a UserError naming file and line."""
    where = f"{path}:{line}"
    values = {}
    for key in FIELDS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            found = "missing" if value is None else f"got {value!r}"
            raise UserError(f"{where}: --judge needs a non-empty string '{key}' in every record ({found}); "
                            "use a split prepared from judge records (question, answer_a, answer_b, verdict)")
        values[key] = value
    verdict = parse_verdict(record.get("verdict"))
    if verdict is None:
        raise UserError(f"{where}: 'verdict' must be A, B or tie, got {record.get('verdict')!r}")
    messages = record.get("messages")
    system = None
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = messages[0].get("content")
    return JudgeItem(line=line, verdict=verdict, system=system, **values)


class JudgePrompt:
    """Turns a JudgeItem into the chat messages the judge answers (without the assistant turn)."""

    def __init__(self, template_file: str | Path | None = None) -> None:
        self.template = None
        self.source = "built-in (lorakit.engine.data.formats.judge_messages)"
        if template_file is not None:
            path = Path(template_file)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise UserError(f"--judge-template {path}: cannot read it ({e.strerror or e})") from None
            except UnicodeDecodeError:
                raise UserError(f"--judge-template {path}: not UTF-8 text; give a Jinja template file") from None
            env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
            try:
                self.template = env.from_string(text)
            except jinja2.TemplateSyntaxError as e:
                raise UserError(f"--judge-template {path}:{e.lineno}: invalid Jinja ({e.message})") from None
            self.source = str(path)

    def messages(self, item: JudgeItem) -> list[dict[str, str]]:
        if self.template is None:
            messages = judge_messages(item.question, item.answer_a, item.answer_b)
        else:
            try:
                content = self.template.render(question=item.question, answer_a=item.answer_a,
                                               answer_b=item.answer_b)
            except jinja2.TemplateError as e:
                raise UserError(f"--judge-template {self.source}: {e} (available: {', '.join(FIELDS)})") from None
            except Exception as e:  # noqa: BLE001 - a template is the user's code: any failure is theirs
                raise UserError(f"--judge-template {self.source}: rendering failed ({type(e).__name__}: {e})") from None
            messages = [{"role": "user", "content": content}]
        if item.system is not None:
            messages = [{"role": "system", "content": item.system}, *messages]
        return messages
