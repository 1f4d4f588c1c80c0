"""`lorakit train`: LoRA / DoRA / QLoRA / full fine-tuning with checkpoints, exact resume and metrics."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorakit.cli.common import run_command
from lorakit.cli.options import (
    ConfigOpt,
    DebugOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    QGroupSizeOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    opt,
)
from lorakit.settings import TrainSettings as S

if TYPE_CHECKING:
    from rich.table import Table

    from lorakit.engine.reporter import Reporter
    from lorakit.engine.train import TrainResult
    from lorakit.engine.training.plan import TrainPlan


EXAMPLE = "lorakit train -m M --data data/support --adapter-path runs/s --iters 300"


def command(
    ctx: typer.Context,
    model: ModelOpt = None,
    data: Annotated[Path | None, opt(S, "data")] = None,
    adapter_path: Annotated[Path | None, opt(S, "adapter_path")] = None,
    fine_tune_type: Annotated[str | None, opt(S, "fine_tune_type")] = None,
    lora_rank: Annotated[int | None, opt(S, "lora_rank")] = None,
    lora_alpha: Annotated[float | None, opt(S, "lora_alpha")] = None,
    lora_dropout: Annotated[float | None, opt(S, "lora_dropout")] = None,
    num_layers: Annotated[int | None, opt(S, "num_layers")] = None,
    target_modules: Annotated[str | None, opt(S, "target_modules")] = None,
    train_on: Annotated[str | None, opt(S, "train_on")] = None,
    objective: Annotated[str | None, opt(S, "objective")] = None,
    beta: Annotated[float | None, opt(S, "beta")] = None,
    dpo_loss: Annotated[str | None, opt(S, "dpo_loss")] = None,
    max_seq_length: Annotated[int | None, opt(S, "max_seq_length")] = None,
    pack: Annotated[bool | None, opt(S, "pack")] = None,
    batch_size: Annotated[int | None, opt(S, "batch_size")] = None,
    batch_tokens: Annotated[int | None, opt(S, "batch_tokens")] = None,
    grad_accumulation_steps: Annotated[int | None, opt(S, "grad_accumulation_steps")] = None,
    iters: Annotated[int | None, opt(S, "iters")] = None,
    epochs: Annotated[float | None, opt(S, "epochs")] = None,
    learning_rate: Annotated[float | None, opt(S, "learning_rate")] = None,
    optimizer: Annotated[str | None, opt(S, "optimizer")] = None,
    weight_decay: Annotated[float | None, opt(S, "weight_decay")] = None,
    lr_schedule: Annotated[str | None, opt(S, "lr_schedule")] = None,
    warmup: Annotated[float | None, opt(S, "warmup")] = None,
    min_lr_ratio: Annotated[float | None, opt(S, "min_lr_ratio")] = None,
    max_grad_norm: Annotated[float | None, opt(S, "max_grad_norm")] = None,
    grad_checkpoint: Annotated[bool | None, opt(S, "grad_checkpoint")] = None,
    recompute_swiglu: Annotated[bool | None, opt(S, "recompute_swiglu")] = None,
    recompute_mlp: Annotated[bool | None, opt(S, "recompute_mlp")] = None,
    recompute_mlp_blocks: Annotated[int | None, opt(S, "recompute_mlp_blocks")] = None,
    max_memory: Annotated[float | None, opt(S, "max_memory")] = None,
    autofit: Annotated[bool | None, opt(S, "autofit")] = None,
    plan: Annotated[bool | None, opt(S, "plan")] = None,
    fast_qlora: Annotated[bool | None, opt(S, "fast_qlora")] = None,
    lean_activations: Annotated[bool | None, opt(S, "lean_activations")] = None,
    steps_per_report: Annotated[int | None, opt(S, "steps_per_report")] = None,
    steps_per_eval: Annotated[int | None, opt(S, "steps_per_eval")] = None,
    val_batches: Annotated[int | None, opt(S, "val_batches")] = None,
    save_every: Annotated[int | None, opt(S, "save_every")] = None,
    keep_last: Annotated[int | None, opt(S, "keep_last")] = None,
    early_stopping_patience: Annotated[int | None, opt(S, "early_stopping_patience")] = None,
    resume: Annotated[bool | None, opt(S, "resume")] = None,
    resume_from: Annotated[Path | None, opt(S, "resume_from")] = None,
    overwrite: Annotated[bool | None, opt(S, "overwrite")] = None,
    seed: SeedOpt = None, revision: RevisionOpt = None, trust_remote_code: TrustRemoteCodeOpt = None,
    quantize: QuantizeOpt = None, q_group_size: QGroupSizeOpt = None, dtype: DtypeOpt = None,
    dist_timeout: Annotated[float | None, opt(S, "dist_timeout")] = None,
    config: ConfigOpt = None, json_output: JsonOpt = None, quiet: QuietOpt = None, debug: DebugOpt = None,
) -> None:
    """Fine-tune --model on --data (train.jsonl, valid.jsonl) and write an mlx-lm adapter to --adapter-path."""
    run_command("train", ctx.params, _run, _render, hint=_hint)


def _run(settings: S, reporter: Reporter) -> TrainResult:
    from lorakit.engine import train as engine

    return engine.run(settings, reporter)


def _hint(result: TrainResult | TrainPlan) -> str:
    from lorakit.engine.training.plan import TrainPlan

    if isinstance(result, TrainPlan):
        return "to train as planned, run the same command without --plan"
    return f"see the run: lorakit report {shlex.quote(result.adapter_path)}"


def _render(result: TrainResult | TrainPlan, settings: S) -> None:
    from lorakit.engine.training.plan import TrainPlan

    if isinstance(result, TrainPlan):
        from lorakit.cli.reporting import out_console

        out_console().print(_plan_table(result))
        return
    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    typer.echo(f"trained {result.steps} steps ({result.epochs:g} epochs"
               f"{', stopped early' if result.stopped_early else ''}): val loss {loss(result.initial_val_loss)} "
               f"-> {loss(result.final_val_loss)}, best {loss(result.best_val_loss)} at step {result.best_step}")
    typer.echo(f"adapter: {result.adapter_path}" + (f" (best: {result.best_path})" if result.best_path else ""))
    typer.echo(f"report: {result.report_file}  metrics: {result.metrics_file}  curve: {result.loss_curve}")


def _plan_table(plan: TrainPlan) -> Table:
    from rich.table import Table

    table = Table(title="lorakit train --plan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in plan.rows():
        table.add_row(name, value)
    return table
