"""`--help` in the style of uv and ruff: plain text that reads well at 80 columns, each option with its
description then `[env: LORAKIT_...]`, `[default: ...]` or `[required]`, and `[possible values: ...]`;
booleans as `--x / --no-x` without a type placeholder; and an example under each command.

The notes come from the command's settings fields (lorakit.settings.SETTINGS), so they cannot drift from what
the settings accept; the option's own help stays the field's description.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from typer.core import TyperCommand

from lorakit.cli.options import PLAIN_FLAGS
from lorakit.settings import SETTINGS


def possible_values(annotation: Any) -> list[str]:
    """The values of a Literal annotation (also inside `X | None`), else []."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [v for arg in typing.get_args(annotation) for v in possible_values(arg)]
    return []


def notes(command: str, param: Any) -> list[str]:
    """The bracketed notes after an option's help: env variable, default or required, possible values."""
    field = SETTINGS[command].model_fields.get(param.name) if command in SETTINGS else None
    shown = param.show_default if isinstance(param.show_default, str) else None
    if field is None:  # --config, --help
        return [f"[default: {shown}]"] if shown and shown != "none" else []
    out = [f"[env: LORAKIT_{param.name.upper()}]"]
    if field.is_required():
        out.append("[required]")
    elif shown and shown != "none" and param.name not in PLAIN_FLAGS:
        out.append(f"[default: {shown}]")
    values = possible_values(field.annotation)
    if values:
        out.append(f"[possible values: {', '.join(values)}]")
    return out


def wrap(description: str, notes: list[str], width: int) -> list[str]:
    """The description's words, then each note kept whole on one line where it fits, wrapped at `width`."""
    atoms = description.split() + [n if len(n) <= width else w for n in notes for w in (
        [n] if len(n) <= width else n.split())]
    lines: list[str] = []
    for atom in atoms:
        if lines and len(lines[-1]) + 1 + len(atom) <= width:
            lines[-1] += " " + atom
        else:
            lines.append(atom)
    return lines


class Command(TyperCommand):
    """A lorakit command: its options listed with the notes above, and `epilog` shown as its example."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str, list[str]]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names = record[0]
            if param.param_type_name == "argument":
                names = names.split(" ")[0]  # the metavar alone (INPUT, PATH)
            kind = "Arguments" if param.param_type_name == "argument" else "Options"
            sections[kind].append((names, param.help or "", notes(self.name or "", param)))
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    _write_rows(formatter, rows)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        if self.epilog:
            with formatter.section("Example"):
                for line in self.epilog.strip().splitlines():
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


def _write_rows(formatter: Any, rows: list[tuple[str, str, list[str]]]) -> None:
    """click's definition list (names, then the help beside them or under a long name), wrapped by `wrap`."""
    first = min(max(len(names) for names, _, _ in rows), 30) + 2
    indent = formatter.current_indent
    width = max(formatter.width - first - indent, 20)
    for names, description, extra in rows:
        lines = wrap(description, extra, width) or [""]
        if len(names) <= first - 2:
            formatter.write(f"{'':>{indent}}{names:<{first}}{lines[0]}\n")
        else:
            formatter.write(f"{'':>{indent}}{names}\n{'':>{indent + first}}{lines[0]}\n")
        for line in lines[1:]:
            formatter.write(f"{'':>{indent + first}}{line}\n")
