"""The `lorakit` command: a thin Typer app. Importing it must stay cheap (no MLX) so --help is instant."""

from __future__ import annotations

from typing import Annotated

import typer

from lorakit.cli import eval as eval_command  # the module name would hide the builtin
from lorakit.cli import fuse, generate, prepare, train

app = typer.Typer(
    name="lorakit",
    help="LoRA / DoRA / QLoRA fine-tuning on Apple MLX: prepare -> train -> eval -> generate -> fuse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_text() -> str:
    from importlib.metadata import version

    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported: keep above the mlx imports
    import mlx.core as mx

    from lorakit import __version__
    from lorakit.blas import blas_in_use

    return "\n".join([
        f"lorakit {__version__}",
        f"mlx {version('mlx')}",
        f"mlx-lm {version('mlx-lm')}",
        f"device: {mx.default_device()}",
        f"blas: {blas_in_use()}",
    ])


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                    help="Show versions, MLX device and BLAS, then exit.")] = False,
) -> None:
    """LoRA fine-tuning on MLX."""


app.command("prepare")(prepare.command)
app.command("train")(train.command)
app.command("eval")(eval_command.command)
app.command("generate")(generate.command)
app.command("fuse")(fuse.command)


def main() -> None:
    app()
