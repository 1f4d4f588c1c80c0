"""Command-line options built from the settings fields; the shared ones (output, seed, model, sampling) are
declared once here and used by every command that has them.

A field's spelling is decided here by its name alone, so it reads the same in every command: its flag
(`settings.flag`), its short alias (SHORT), and `--x/--no-x` for a bool unless it is a plain action flag
(PLAIN_FLAGS). Help and the shown default come from the field. An option is typed `X | None` with default
None: None means "not given", so env variables, the config file and the field's default still apply.
A command's parameters declare its flags; `run_command` reads the values the user gave from `ctx.params`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.settings import Common, ModelOptions, RenderingOptions, SamplingOptions, SeedOption, flag

SHORT = {"model": "-m", "out": "-o", "output": "-o", "prompt": "-p", "input": "-i", "quiet": "-q"}
# False-default bools that switch an action on: `--overwrite`, never `--overwrite/--no-overwrite`.
PLAIN_FLAGS = {"json_output", "quiet", "debug", "overwrite", "trust_remote_code", "resume", "plan"}


def opt(cls: type[Common | SeedOption | SamplingOptions | RenderingOptions], name: str, **kwargs: Any) -> Any:
    """The typer.Option of settings field `name` of `cls`: its spelling, help and shown default (a
    `show_default` in kwargs replaces the one derived from the field)."""
    field = cls.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default)) or None
    shown = "required" if field.is_required() else ("none" if default is None else str(default))
    decl = flag(name)
    if field.annotation in (bool, bool | None) and name not in PLAIN_FLAGS:  # None: "decide for me"
        if isinstance(default, bool):  # the flag that is in effect by default, as click shows it
            shown = decl if default else f"--no-{decl[2:]}"
        decl = f"{decl}/--no-{decl[2:]}"
    decls = (decl, SHORT[name]) if name in SHORT else (decl,)
    return typer.Option(*decls, help=field.description, **{"show_default": shown, **kwargs})


def _stop_strings(value: list[str] | None) -> list[str] | None:
    """Repeated --stop flags and comma-separated values both work (a YAML list keeps its commas)."""
    parts = [part for v in value or () for part in v.split(",") if part]
    return parts or None


# output: every command
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.", show_default="none")]
JsonOpt = Annotated[bool | None, opt(Common, "json_output")]
QuietOpt = Annotated[bool | None, opt(Common, "quiet")]
DebugOpt = Annotated[bool | None, opt(Common, "debug")]

# every command that draws random numbers (all but fuse)
SeedOpt = Annotated[int | None, opt(SeedOption, "seed")]

# loading the base model: train, eval, generate, fuse
ModelOpt = Annotated[str | None, opt(ModelOptions, "model")]
RevisionOpt = Annotated[str | None, opt(ModelOptions, "revision")]
TrustRemoteCodeOpt = Annotated[bool | None, opt(ModelOptions, "trust_remote_code")]
QuantizeOpt = Annotated[int | None, opt(ModelOptions, "quantize")]
QGroupSizeOpt = Annotated[int | None, opt(ModelOptions, "q_group_size")]
DtypeOpt = Annotated[str | None, opt(ModelOptions, "dtype")]

# sampling: generate, eval --generate / --judge
MaxTokensOpt = Annotated[int | None, opt(SamplingOptions, "max_tokens")]
TempOpt = Annotated[float | None, opt(SamplingOptions, "temp")]
TopPOpt = Annotated[float | None, opt(SamplingOptions, "top_p")]
TopKOpt = Annotated[int | None, opt(SamplingOptions, "top_k")]
MinPOpt = Annotated[float | None, opt(SamplingOptions, "min_p")]
RepetitionPenaltyOpt = Annotated[float | None, opt(SamplingOptions, "repetition_penalty")]
StopOpt = Annotated[list[str] | None, opt(SamplingOptions, "stop", callback=_stop_strings)]

# prompt rendering: eval, generate
ChatTemplateOpt = Annotated[bool | None, opt(RenderingOptions, "chat_template", show_default="as trained")]
TemplateOpt = Annotated[str | None, opt(RenderingOptions, "template")]
