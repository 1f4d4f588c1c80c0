"""What every command shares: from the flags given to a rendered result, and the one exception boundary."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from lorakit.errors import Interrupted, LorakitError
from lorakit.settings import Common, flag, load_settings

if TYPE_CHECKING:
    from lorakit.engine.reporter import Reporter

Run = Callable[[Any, "Reporter"], Any]  # (settings, reporter) -> the engine's result
Render = Callable[[Any, Common], None]  # (result, settings): stdout, unless --json
# (result, the CLI's reporter): stderr tables and lines, unless --quiet
Summary = Callable[[Any, "Reporter"], None]
Hint = Callable[[Any], str]  # result -> the next command to try (stderr, last, unless --quiet)

# The outputs a command replaces whole with --overwrite: the --config file it read must not be inside one.
# (train's `<adapter>/lorakit.yaml` read back with --resume is its documented flow: train checks its own.)
REPLACED_OUTPUTS = {"prepare": ("out",), "fuse": ("out", "export_gguf"), "report": ("out",)}


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


def given(params: Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user gave as settings input, plain data like the env and the config give: paths as text,
    a repeated flag as a list. None (not given) and a repeatable flag given no time are left out."""
    flags = {name: _plain(value) for name, value in params.items()}
    return {name: value for name, value in flags.items() if value is not None and value != []}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _keep_config(command: str, settings: Common, config: Any) -> None:
    """Refuse an output that is or contains the --config file: replacing it would delete that input."""
    if config is None:
        return
    from lorakit.io import check_output_location

    for name in REPLACED_OUTPUTS.get(command, ()):
        if getattr(settings, name, None) is not None:
            check_output_location(getattr(settings, name), flag(name), [("--config", config)])


def run_command(command: str, params: Mapping[str, Any], run: Run, render: Render,
                summary: Summary | None = None, hint: Hint | None = None) -> None:
    """Resolve the settings of `command` from its flags (a command's `ctx.params`), run the engine through
    `run`, then present the result and the `hint`; map every failure to its exit code."""
    from lorakit.cli.reporting import RichReporter, err_console

    flags = given(params)
    config = flags.pop("config", None)
    debug = _wants_debug(flags)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        settings, notes = load_settings(command, flags, config)
        _keep_config(command, settings, config)
        reporter = RichReporter(quiet=settings.quiet)
        for note in notes:
            reporter.warn(note)
        result = run(settings, reporter)
        reporter.close()
        if not _is_main_rank():  # under mlx.launch every rank runs the command; rank 0 prints the result
            return
        if summary is not None:
            summary(result, reporter)
        if settings.json_output:
            print_json(result)
        else:
            render(result, settings)
        if hint is not None and not settings.quiet:
            err_console().print(hint(result), highlight=False, markup=False, soft_wrap=True)
    except Interrupted as e:
        err_console().print(f"[yellow]interrupted:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        err_console().print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except LorakitError as e:
        if debug:
            traceback.print_exc()
        # messages quote file names and data ('odd[/]name.jsonl'): never rich markup
        err_console().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - a bug or an environment failure: exit 1, traceback only with --debug
        if debug:
            traceback.print_exc()
        err_console().print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}", highlight=False,
                            soft_wrap=True)
        if not debug:
            err_console().print("(rerun with --debug for the traceback)")
        raise typer.Exit(1) from None
