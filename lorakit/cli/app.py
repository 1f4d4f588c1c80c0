"""The `lorakit` command: a thin Typer app. Importing it must stay cheap (no MLX) so --help is instant."""

from __future__ import annotations

from typing import Annotated

import typer

from lorakit.cli import eval as eval_command  # the module name would hide the builtin
from lorakit.cli import fuse, generate, models, prepare, report, train
from lorakit.cli.help import Command

app = typer.Typer(
    name="lorakit",
    help="LoRA / DoRA / QLoRA fine-tuning on Apple MLX: prepare -> train -> eval -> generate -> fuse; "
         "report shows it all on one HTML page.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help like uv's and ruff's (lorakit.cli.help)
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
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


COMMAND_TABLE = (  # name, module, the line `lorakit --help` shows
    ("prepare", prepare, "Validate raw JSONL, normalise it, split it into train/valid/test."),
    ("train", train, "LoRA, DoRA, QLoRA or full fine-tuning with exact resume."),
    ("eval", eval_command, "Loss, generation and judge metrics: base vs adapter."),
    ("generate", generate, "Text from a base model, an adapter or a fused model."),
    ("fuse", fuse, "Merge the adapter into the base: mlx-lm, Hugging Face and GGUF."),
    ("report", report, "One HTML page: data, loss tokens, curves, evals, generations."),
    ("models", models, "Model directories converted from .gguf files (for mlx-lm)."),
)
for _name, _module, _summary in COMMAND_TABLE:
    app.command(_name, cls=Command, epilog=_module.EXAMPLE, short_help=_summary)(_module.command)


def main() -> None:
    app()
