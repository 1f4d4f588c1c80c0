"""Chat templates (Hugging Face Jinja dialect): the built-in ones by name, a user's Jinja file, and a renderer that
behaves like HF's apply_chat_template.

The built-in templates' source text and FAMILY_TOKENS (each family's own special tokens, for rendering without a
tokenizer) live in lorakit.builtin_templates, which imports no Jinja. Like HF, `bos_token` / `eos_token` come
from the tokenizer at render time, so a template set as `tokenizer.chat_template` uses that tokenizer's special
tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lorakit.builtin_templates import BUILTIN_TEMPLATES, FAMILY_TOKENS
from lorakit.errors import UserError

__all__ = ["BUILTIN_TEMPLATES", "FAMILY_TOKENS", "get_template", "render"]


def get_template(name_or_path: str) -> str:
    """A built-in template by name, or the text of a user's Jinja file."""
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--template {path}: not UTF-8 text; give a Jinja template file") from None
        try:
            _compile(text)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"--template {path}:{e.lineno}: invalid Jinja ({e.message})") from None
        return text
    names = ", ".join(BUILTIN_TEMPLATES)
    if path.suffix or "/" in name_or_path:
        raise UserError(f"--template {name_or_path}: file not found; give a Jinja file or one of: {names}")
    raise UserError(f"--template {name_or_path}: unknown template; use one of: {names}, or a Jinja file path")


def render(messages: list[dict[str, Any]], template: str, add_generation_prompt: bool = False,
           **context: Any) -> str:
    """Render a conversation like HF's apply_chat_template(tokenize=False).

    `context` holds further template variables (tools, bos_token, eos_token, ...); None values are left
    undefined, as HF does for special tokens a tokenizer lacks. A template's raise_exception becomes a
    ValueError.
    """
    variables = {k: v for k, v in context.items() if v is not None}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
    except jinja2.TemplateNotFound as e:
        raise ValueError(f"chat template: it includes or imports '{e.name}'; a chat template must be "
                         "self-contained") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    except Exception as e:  # noqa: BLE001 - a template is code from a model or a user: any failure is theirs
        raise ValueError(f"chat template: rendering failed ({type(e).__name__}: {e})") from None


class _GenerationTag(Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` marker (it only renders its body here)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; HF's (which templates expect) does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    # An empty loader: `{% include %}` / `{% import %}` fail as TemplateNotFound, never reach the disk.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.DictLoader({}),
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
