"""`lorakit train`: LoRA / DoRA / QLoRA / full fine-tuning with checkpoints, exact resume and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lorakit.cli.common import ConfigOpt, DebugOpt, JsonOpt, QuietOpt, opt, run_command
from lorakit.settings import TrainSettings as S


def command(
    model: Annotated[Optional[str], opt(S, "model", "--model", "-m")] = None,
    data: Annotated[Optional[Path], opt(S, "data")] = None,
    adapter_path: Annotated[Optional[Path], opt(S, "adapter_path")] = None,
    fine_tune_type: Annotated[Optional[str], opt(S, "fine_tune_type")] = None,
    lora_rank: Annotated[Optional[int], opt(S, "lora_rank")] = None,
    lora_alpha: Annotated[Optional[float], opt(S, "lora_alpha")] = None,
    lora_dropout: Annotated[Optional[float], opt(S, "lora_dropout")] = None,
    num_layers: Annotated[Optional[int], opt(S, "num_layers")] = None,
    target_modules: Annotated[Optional[str], opt(S, "target_modules")] = None,
    train_on: Annotated[Optional[str], opt(S, "train_on")] = None,
    max_seq_length: Annotated[Optional[int], opt(S, "max_seq_length")] = None,
    pack: Annotated[Optional[bool], opt(S, "pack")] = None,
    batch_size: Annotated[Optional[int], opt(S, "batch_size")] = None,
    grad_accumulation_steps: Annotated[Optional[int], opt(S, "grad_accumulation_steps")] = None,
    iters: Annotated[Optional[int], opt(S, "iters")] = None,
    epochs: Annotated[Optional[float], opt(S, "epochs")] = None,
    learning_rate: Annotated[Optional[float], opt(S, "learning_rate")] = None,
    optimizer: Annotated[Optional[str], opt(S, "optimizer")] = None,
    weight_decay: Annotated[Optional[float], opt(S, "weight_decay")] = None,
    lr_schedule: Annotated[Optional[str], opt(S, "lr_schedule")] = None,
    warmup: Annotated[Optional[float], opt(S, "warmup")] = None,
    min_lr_ratio: Annotated[Optional[float], opt(S, "min_lr_ratio")] = None,
    max_grad_norm: Annotated[Optional[float], opt(S, "max_grad_norm")] = None,
    grad_checkpoint: Annotated[Optional[bool], opt(S, "grad_checkpoint")] = None,
    steps_per_report: Annotated[Optional[int], opt(S, "steps_per_report")] = None,
    steps_per_eval: Annotated[Optional[int], opt(S, "steps_per_eval")] = None,
    val_batches: Annotated[Optional[int], opt(S, "val_batches")] = None,
    save_every: Annotated[Optional[int], opt(S, "save_every")] = None,
    keep_last: Annotated[Optional[int], opt(S, "keep_last")] = None,
    early_stopping_patience: Annotated[Optional[int], opt(S, "early_stopping_patience")] = None,
    resume: Annotated[Optional[bool], opt(S, "resume", "--resume")] = None,
    resume_from: Annotated[Optional[Path], opt(S, "resume_from")] = None,
    overwrite: Annotated[Optional[bool], opt(S, "overwrite", "--overwrite")] = None,
    seed: Annotated[Optional[int], opt(S, "seed")] = None,
    revision: Annotated[Optional[str], opt(S, "revision")] = None,
    trust_remote_code: Annotated[Optional[bool], opt(S, "trust_remote_code", "--trust-remote-code")] = None,
    quantize: Annotated[Optional[int], opt(S, "quantize")] = None,
    q_group_size: Annotated[Optional[int], opt(S, "q_group_size")] = None,
    dtype: Annotated[Optional[str], opt(S, "dtype")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = None,
    quiet: QuietOpt = None,
    debug: DebugOpt = None,
) -> None:
    """Fine-tune --model on --data (train.jsonl, valid.jsonl) and write an mlx-lm adapter to --adapter-path."""
    run_command("train", locals(), _render)


def _render(result: Any, settings: S) -> None:
    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    typer.echo(f"trained {result.steps} steps ({result.epochs:g} epochs"
               f"{', stopped early' if result.stopped_early else ''}): val loss {loss(result.initial_val_loss)} "
               f"-> {loss(result.final_val_loss)}, best {loss(result.best_val_loss)} at step {result.best_step}")
    typer.echo(f"adapter: {result.adapter_path}" + (f" (best: {result.best_path})" if result.best_path else ""))
    typer.echo(f"report: {result.report_file}  metrics: {result.metrics_file}  curve: {result.loss_curve}")
