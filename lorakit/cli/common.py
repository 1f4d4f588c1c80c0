"""What every command shares: options built from the settings fields, and the one exception boundary."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lorakit.errors import Interrupted, LorakitError
from lorakit.settings import Common, load_settings


def opt(cls: type[Common], name: str, *decls: str, **kwargs: Any) -> Any:
    """A typer.Option whose help and shown default come from the settings field (one source of truth)."""
    field = cls.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default)) or None
    shown = "required" if field.is_required() else ("none" if default is None else str(default))
    if isinstance(default, bool) and not decls:
        flag = name.replace("_", "-")
        decls = (f"--{flag}/--no-{flag}",)
    return typer.Option(*(decls or ("--" + name.replace("_", "-"),)), help=field.description,
                        show_default=shown, **kwargs)


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file.",
                                                   show_default="none")]
JsonOpt = Annotated[Optional[bool], typer.Option("--json", help="Print the result as one JSON object on stdout.",
                                                 show_default="off")]
QuietOpt = Annotated[Optional[bool], typer.Option("--quiet", "-q", help="No progress or info on stderr.",
                                                  show_default="off")]
DebugOpt = Annotated[Optional[bool], typer.Option("--debug", help="Show tracebacks (or LORAKIT_DEBUG=1).",
                                                  show_default="off")]


def _wants_debug(params: dict[str, Any]) -> bool:
    return bool(params.get("debug")) or os.environ.get("LORAKIT_DEBUG", "").lower() in ("1", "true", "yes")


def to_jsonable(result: Any) -> Any:
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    return json.loads(json.dumps(result, default=str))


def print_json(result: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(result), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _sigterm_as_interrupt(signum, frame):  # SIGTERM takes the same path as Ctrl-C: save, then exit 130
    raise KeyboardInterrupt


def _is_main_rank() -> bool:
    from lorakit.engine.model.distributed import world

    return world().is_main


def run_command(command: str, params: dict[str, Any], render: Callable[[Any, Common], None]) -> None:
    """Resolve settings, run the engine, render the result; map every failure to its exit code."""
    from lorakit.cli.reporting import RichReporter, err_console

    params = dict(params)
    config = params.pop("config", None)
    debug = _wants_debug(params)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        settings, notes = load_settings(command, params, config)
        reporter = RichReporter(quiet=settings.quiet)
        for note in notes:
            reporter.warn(note)
        engine = importlib.import_module(f"lorakit.engine.{command}")
        result = engine.run(settings, reporter)
        reporter.close()
        if not _is_main_rank():  # under mlx.launch every rank runs the command; rank 0 prints the result
            return
        if settings.json_output:
            print_json(result)
        else:
            render(result, settings)
    except Interrupted as e:
        err_console().print(f"[yellow]interrupted:[/] {e}", highlight=False)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except LorakitError as e:
        if debug:
            traceback.print_exc()
        err_console().print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except typer.Exit:
        raise
    except Exception as e:  # a bug or an environment failure: exit 1, traceback only with --debug
        if debug:
            traceback.print_exc()
        err_console().print(f"[bold red]error:[/] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        if not debug:
            err_console().print("(rerun with --debug for the traceback)")
        raise typer.Exit(1) from None
