"""`lorakit train`: LoRA / DoRA / full fine-tuning with a compiled MLX step, checkpoints and exact resume.

`run` checks the flags, loads the model and data, adds the adapters, plans the batches and restores a
checkpoint; `lorakit.engine.training.trainer.Trainer` then runs the loop.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import yaml
from mlx import nn
from mlx.utils import tree_flatten

from lorakit.engine.data.batching import BatchPlan, PairPlan, filling_pays_off
from lorakit.engine.data.tokenized import Split, load_split, rendering_of, split_path
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model import distributed as dist
from lorakit.engine.model.adapters import adapter_config, apply_adapters
from lorakit.engine.model.loading import LoadedModel, load_model
from lorakit.engine.model.losses import loss_head
from lorakit.engine.model.qlora import helps_here, use_dequantized_matmuls
from lorakit.engine.reporter import Reporter
from lorakit.engine.training import fit
from lorakit.engine.training.layout import Layout, free_fields
from lorakit.engine.training.lean import use_lean_swiglu
from lorakit.engine.training.objective import Objective, objective_for, reference_logps
from lorakit.engine.training.optimizer import make_optimizer
from lorakit.engine.training.output import RunOutput, remove_leftovers
from lorakit.engine.training.plan import TrainPlan, predict
from lorakit.engine.training.result import CURVE, METRICS, REPORT, SETTINGS_FILE, RunSizes, TrainResult
from lorakit.engine.training.speedups import use_grad_checkpoint, use_mixed_precision_lora
from lorakit.engine.training.state import TrainState
from lorakit.engine.training.trainer import Batches, Trainer
from lorakit.errors import UserError
from lorakit.io import check_output_location, output_lock, sha256_file, staging_dir
from lorakit.settings import TrainSettings, save_settings

__all__ = ["CURVE", "METRICS", "REPORT", "SETTINGS_FILE", "TrainResult", "run", "use_grad_checkpoint",
           "use_mixed_precision_lora"]


def run(settings: TrainSettings, reporter: Reporter) -> TrainResult | TrainPlan:
    """Train (or, with --plan, measure the run and return its plan, writing nothing)."""
    wall_start = time.perf_counter()
    world = dist.world()  # under mlx.launch: this rank of the data-parallel group (else a group of one)
    reporter = world.reporter(reporter)
    dist.check_batch_size(settings.batch_size, world)
    settings = _without_autofit_when_distributed(settings, world, reporter)
    fit.shallow_queue(settings.max_memory)
    if settings.plan:
        return _plan_only(settings, reporter, world)
    # Before anything is written: an --adapter-path that is, holds or sits in an input would swallow it.
    check_output_location(settings.adapter_path, "--adapter-path",
                          [("--data", settings.data), ("--model", settings.model)])
    with _adapter_path_lock(settings.adapter_path, world):
        return _run(settings, reporter, world, wall_start)


@contextlib.contextmanager
def _adapter_path_lock(out: Path, world: dist.World) -> Iterator[None]:
    """One run at a time in --adapter-path (rank 0 writes, so rank 0 holds the lock); a killed run's
    half-written files are cleared under it."""
    if not world.is_main:
        yield
        return
    with output_lock(out, "--adapter-path"):
        remove_leftovers(out)
        yield


def _without_autofit_when_distributed(settings: TrainSettings, world: dist.World,
                                      reporter: Reporter) -> TrainSettings:
    """Under mlx.launch every rank must lay out batches alike: no per-rank measuring, fixed-size batches."""
    if not world.is_distributed:
        return settings
    if settings.batch_tokens is not None:
        raise UserError(f"--batch-tokens: token budgets give batches of uneven rows, which do not split over "
                        f"{world.size} processes; use --batch-size under mlx.launch")
    if free_fields(settings):
        reporter.log("autofit is off under mlx.launch: the layout is your --batch-size, --pack, "
                     "--grad-accumulation-steps and --grad-checkpoint")
    return settings.model_copy(update={"autofit": False})


def _plan_only(settings: TrainSettings, reporter: Reporter, world: dist.World) -> TrainPlan:
    """--plan: load and measure as the run would, predict it, write nothing."""
    loaded, head, train_set, _ = _load(settings, reporter)
    _add_adapters(settings, loaded, train_set)
    choice = fit.choose(_fixed_for_preferences(settings, train_set), loaded.model, head, train_set, timed=True,
                        reporter=reporter)
    settings = settings.model_copy(update=choice.layout.update())
    batches = _plan_batches(settings, train_set, None, world, reporter)
    return predict(choice, batches.plan, batches.total_steps)


def _choose_layout(settings: TrainSettings, loaded: LoadedModel, head: str | None, train_set: Split,
                   resume_ckpt: Path | None, reporter: Reporter) -> TrainSettings:
    """The settings with the run's layout: autofit's choice, or the resumed run's own."""
    settings = _fixed_for_preferences(settings, train_set)
    if resume_ckpt is not None:
        settings = _saved_layout(settings, resume_ckpt)
    choice = fit.choose(settings, loaded.model, head, train_set, timed=False, reporter=reporter)
    _show_choice(choice, reporter)
    gc.collect()
    mx.reset_peak_memory()  # the run's peak is training's (not the model load's, nor the probe's)
    return settings.model_copy(update=choice.layout.update())


def _fixed_for_preferences(settings: TrainSettings, train_set: Split) -> TrainSettings:
    """Preference pairs have their own batches (PairPlan: --batch-size pairs; --pack as given): no autofit."""
    return settings.model_copy(update={"autofit": False}) if train_set.format == "preference" else settings


def _run(settings: TrainSettings, reporter: Reporter, world: dist.World, wall_start: float) -> TrainResult:
    resume_ckpt, clear = _start_point(settings, reporter)
    loaded, head, train_set, valid_set = _load(settings, reporter)
    objective = objective_for(settings, train_set, valid_set, head, reporter)
    references = _references(objective, settings, loaded, head, train_set, valid_set, reporter)
    lora_parameters, adapter_cfg = _add_adapters(settings, loaded, train_set)
    settings = _choose_layout(settings, loaded, head, train_set, resume_ckpt, reporter)
    batches = _plan_batches(settings, train_set, valid_set, world, reporter, references)
    optimizer = make_optimizer(settings, batches.total_steps)
    optimizer.init(loaded.model.trainable_parameters())
    state = TrainState(train_data_sha256=sha256_file(train_set.path), seed=settings.seed,
                       world_size=world.size)
    if resume_ckpt is not None:
        dist.check_resume_world(resume_ckpt, world)
        saved = ckpt.load_checkpoint(resume_ckpt, loaded.model, optimizer)
        state = _resumed_state(state, saved, resume_ckpt, train_set, batches.total_steps, reporter)
    output = _claim_adapter_path(settings, state, batches, world, clear, reporter)
    with output.kept_on_failure(), dist.lost_rank_errors(world):
        sizes = _sizes(loaded.model, train_set, valid_set)
        _show_start(settings, loaded, lora_parameters, train_set, valid_set, batches, sizes, reporter)
        trainer = Trainer(settings, reporter, world=world, loaded=loaded, head=head, adapter_cfg=adapter_cfg,
                          optimizer=optimizer, batches=batches, state=state, sizes=sizes,
                          resumed_from=resume_ckpt, wall_start=wall_start, output=output, objective=objective)
        with fit.queue_limit(settings):
            return trainer.train()


def _load(settings: TrainSettings, reporter: Reporter) -> tuple[LoadedModel, str | None, Split, Split | None]:
    """The model, how its loss projects hidden states (losses.loss_head), and the tokenised splits."""
    split_path(settings.data, "train")  # fail on a wrong --data before the (slow) model load
    loaded = load_model(settings, reporter)
    if settings.fast_qlora and helps_here():  # before DPO's reference log-probs: they must match the policy's
        use_dequantized_matmuls(loaded.model)
    head = loss_head(loaded.model)
    return (loaded, head, *_load_splits(settings, loaded, reporter))


def _start_point(settings: TrainSettings, reporter: Reporter) -> tuple[Path | None, bool]:
    """Check --adapter-path against --resume/--resume-from/--overwrite.

    Returns the checkpoint to resume (or None) and whether the directory's old contents are to be replaced.
    """
    out = settings.adapter_path
    if out.exists() and not out.is_dir():
        raise UserError(f"--adapter-path {out}: exists and is not a directory")
    if settings.resume_from is not None:
        problem = ckpt.problem(settings.resume_from) if settings.resume_from.is_dir() else "not a directory"
        if problem:
            raise UserError(f"--resume-from {settings.resume_from}: {problem}")
        if suspect := ckpt.suspect_reason(settings.resume_from):
            reporter.warn(f"--resume-from {settings.resume_from}: marked suspect ({suspect}); resuming it "
                          "as asked")
        return settings.resume_from, False
    has_files = out.is_dir() and any(out.iterdir())
    if settings.resume:
        found = ckpt.latest_valid(out, reporter)
        if found is None and has_files:
            raise UserError(f"--resume: no intact checkpoint under {out / ckpt.CHECKPOINTS}; "
                            "pass --overwrite to start over")
        if found is None:
            reporter.warn(f"--resume: nothing to resume in {out}; starting a new run")
        return found, False
    if has_files and not settings.overwrite:
        raise UserError(f"--adapter-path {out}: directory is not empty; pass --resume to continue its run, "
                        "--overwrite to start over, or choose another --adapter-path")
    return None, has_files


def _load_splits(settings: TrainSettings, loaded: LoadedModel,
                 reporter: Reporter) -> tuple[Split, Split | None]:
    """The tokenized train split, and the validation split when --data has one."""
    def load(name: str) -> Split:
        return load_split(settings.data, name, loaded.tokenizer, settings.train_on, settings.max_seq_length,
                          reporter)

    train_set = load("train")
    if (Path(settings.data) / "valid.jsonl").exists():
        return train_set, load("valid")
    if settings.early_stopping_patience:
        raise UserError("--early-stopping-patience needs a validation split: no valid.jsonl in "
                        f"{settings.data}")
    reporter.warn(f"no valid.jsonl in {settings.data}: no validation, no best/ checkpoint")
    return train_set, None


def _add_adapters(settings: TrainSettings, loaded: LoadedModel, train_set: Split) -> tuple[dict, dict]:
    """Add the adapters (or unfreeze the model for full fine-tuning); return their parameters and config."""
    blocks = len(loaded.model.layers)
    if settings.num_layers != -1 and not 1 <= settings.num_layers <= blocks:
        raise UserError(f"--num-layers {settings.num_layers}: {loaded.name} has {blocks} transformer blocks; "
                        f"pass 1 to {blocks}, or -1 for all of them")
    mx.random.seed(settings.seed)
    lora_parameters = apply_adapters(loaded.model, settings)
    adapter_cfg = adapter_config(settings, loaded, lora_parameters,
                                 rendering=rendering_of(train_set, loaded.tokenizer))
    use_mixed_precision_lora(loaded.model)
    if settings.lean_activations:
        use_lean_swiglu(loaded.model, loaded.config)
    return lora_parameters, adapter_cfg  # gradient checkpointing comes with the layout (fit.choose)


def _saved_layout(settings: TrainSettings, checkpoint: Path) -> TrainSettings:
    """A resumed run keeps the layout it started with (its batches are what the checkpoint's position counts):
    the fields no flag sets come from the run's lorakit.yaml (a run from before autofit: fixed batches)."""
    free = free_fields(settings)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == ckpt.CHECKPOINTS else checkpoint.parent
    saved = {}
    for path in (run_dir / SETTINGS_FILE, settings.adapter_path / SETTINGS_FILE):
        if path.is_file():
            saved = yaml.safe_load(path.read_text()) or {}
            break
    before_autofit = Layout(pack=False, batch_size=settings.batch_size, batch_tokens=None,
                            grad_accumulation_steps=1, recompute_mlp=False, grad_checkpoint=False,
                            recompute_swiglu=False)
    update = {name: saved.get(name, getattr(before_autofit, name)) for name in free}
    return settings.model_copy(update={**update, "autofit": False})


def _show_choice(choice: fit.Choice, reporter: Reporter) -> None:
    if not choice.by_autofit:
        return
    measured = (f"; measured peak {choice.measured.peak_bytes / 1e9:.2f} GB of {choice.budget_bytes / 1e9:.2f} GB"
                if choice.measured else "")
    reporter.log(f"autofit: {choice.layout.flags()}{measured}")
    for reason in choice.reasons:
        reporter.log(f"  {reason}")


def _references(objective: Objective, settings: TrainSettings, loaded: LoadedModel, head: str | None,
                train_set: Split, valid_set: Split | None, reporter: Reporter) -> tuple:
    """DPO's reference log-probabilities of the train and valid examples, from the model before its adapters
    are added (the base: LoRA, DoRA, QLoRA or full alike); (None, None) when the objective needs none."""
    if not objective.needs_reference:
        return None, None

    def logps(split: Split | None) -> np.ndarray | None:
        return None if split is None else reference_logps(loaded.model, split.examples, head, settings.batch_size,
                                                          settings.max_seq_length, reporter, split.path.stem)

    return logps(train_set), logps(valid_set)


def _plan(settings: TrainSettings, split: Split, reference: np.ndarray | None, train: bool) -> BatchPlan:
    """The split's batches; `train`: for the compiled step, whose short last batches are filled where that pays."""
    fill = train and filling_pays_off()
    if split.format == "preference":
        return PairPlan(split.examples, settings.batch_size, settings.max_seq_length, seed=settings.seed,
                        pack=settings.pack, reference=reference, fill=fill)
    return BatchPlan(split.examples, settings.batch_size, settings.max_seq_length, pack=settings.pack,
                     seed=settings.seed, batch_tokens=settings.batch_tokens, fill=fill)


def _plan_batches(settings: TrainSettings, train_set: Split, valid_set: Split | None, world: dist.World,
                  reporter: Reporter, references: tuple = (None, None)) -> Batches:
    """This rank's share of the train batches, the validation batches, and how many steps to take."""
    plan = _plan(settings, train_set, references[0], train=True)
    dist.shard_plan(plan, world, reporter, "train")
    steps_per_epoch = len(plan) / settings.grad_accumulation_steps
    total_steps = settings.iters or max(1, math.ceil((settings.epochs or 3.0) * steps_per_epoch))
    val_batches = []
    if valid_set is not None:
        val_plan = _plan(settings, valid_set, references[1], train=False)
        dist.shard_plan(val_plan, world, reporter, "valid")
        order = val_plan.order(0)
        if settings.val_batches >= 0:
            order = order[: max(1, settings.val_batches)]
        val_batches = [val_plan.build(i).to_mx() for i in order]
    return Batches(plan=plan, val=val_batches, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def _resumed_state(fresh: TrainState, saved: dict, checkpoint: Path, train_set: Split, total_steps: int,
                   reporter: Reporter) -> TrainState:
    """The checkpoint's state, with the hash of this run's train data."""
    if saved.get("train_data_sha256") != fresh.train_data_sha256:
        reporter.warn(f"{train_set.path} changed since checkpoint {checkpoint}; resuming at the same "
                      "position in the new data")
    state = TrainState.from_dict({**fresh.to_dict(), **saved, "train_data_sha256": fresh.train_data_sha256})
    reporter.log(f"resuming from {checkpoint} (step {state.step})")
    if state.step >= total_steps:
        reporter.warn(f"checkpoint step {state.step} already reaches the {total_steps} steps asked for; "
                      "raise --iters or --epochs to train further")
    return state


def _claim_adapter_path(settings: TrainSettings, state: TrainState, batches: Batches, world: dist.World,
                        replace: bool, reporter: Reporter) -> RunOutput:
    """Once every rank agrees on the run: where it writes (a staging directory when it replaces an old run),
    with the settings saved there."""
    # A collective, so also a barrier: every rank has looked at --adapter-path before rank 0 writes into it.
    dist.check_same(world, {"step to resume from": state.step, "number of train batches": len(batches.plan)},
                    "every process must see the same --data and --adapter-path checkpoint (a shared folder, "
                    "or the same copy at the same path on every machine)")
    # Everything checked: only now touch --adapter-path (a bad flag or data file leaves it as it was).
    out = settings.adapter_path
    if not world.is_main:
        return RunOutput(out)
    # --overwrite deletes nothing yet: the old run stays until this one has a good checkpoint or finishes.
    output = RunOutput(out, staging_dir(out) if replace else None)
    if replace:
        reporter.log(f"--overwrite: training into {output.path}; it replaces {out} once it has a good "
                     "checkpoint (a failed run leaves the old one as it is)")
    output.path.mkdir(parents=True, exist_ok=True)
    with output.kept_on_failure():
        save_settings(settings.model_copy(update={"resume": False, "overwrite": False, "resume_from": None}),
                      output.path / SETTINGS_FILE)
    return output


def _sizes(model: nn.Module, train_set: Split, valid_set: Split | None) -> RunSizes:
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return RunSizes(train_examples=len(train_set.examples),
                    valid_examples=len(valid_set.examples) if valid_set else 0,
                    truncated_examples=train_set.truncated + (valid_set.truncated if valid_set else 0),
                    trainable_parameters=trainable, total_parameters=get_total_parameters(model))


def _show_start(settings: TrainSettings, loaded: LoadedModel, lora_parameters: dict, train_set: Split,
                valid_set: Split | None, batches: Batches, sizes: RunSizes, reporter: Reporter) -> None:
    """The "lorakit train" table: what is about to be trained on what."""
    s, trainable, total = settings, sizes.trainable_parameters, sizes.total_parameters
    micro_per_epoch, total_steps = len(batches.plan), batches.total_steps
    reporter.table("lorakit train", [
        ("model", f"{loaded.name} ({loaded.source}"
                  f"{', quantized' if 'quantization' in loaded.config else ''})"),
        ("fine-tune", s.fine_tune_type if s.fine_tune_type == "full" else
         f"{s.fine_tune_type} rank {s.lora_rank}, alpha {s.lora_alpha:g}, scale {s.lora_scale:g}, "
         f"{len(lora_parameters.get('keys', []))} module kinds"),
        ("trainable", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"),
        ("objective", s.objective or ("dpo" if train_set.format == "preference" else "sft")),
        ("train data", (f"{train_set.records} {train_set.unit} ({train_set.format}, --train-on "
                        f"{train_set.train_on}), {train_set.tokens:,} tokens, "
                        f"{train_set.loss_tokens:,} trained")),
        ("valid data", f"{valid_set.records} {valid_set.unit}, {len(batches.val)} batches per eval"
         if valid_set else "none"),
        ("batches", _batches_row(s, micro_per_epoch)),
        ("steps", (f"{total_steps} ({total_steps / batches.steps_per_epoch:.2f} epochs), "
                   f"lr {s.learning_rate:g} {s.lr_schedule}, {s.optimizer}")),
    ])


def _batches_row(s: TrainSettings, micro_per_epoch: int) -> str:
    if s.batch_tokens is None:
        size = (f"{s.batch_size} x {s.grad_accumulation_steps} accumulation = "
                f"{s.batch_size * s.grad_accumulation_steps} effective")
    else:
        size = f"up to {s.batch_tokens:,} tokens x {s.grad_accumulation_steps} accumulation"
    blocks = s.recompute_mlp_blocks
    mlps = "MLP recomputed" if blocks is None else f"MLP recomputed in {blocks} blocks"
    extras = [name for name, on in (("packed", s.pack), ("SwiGLU product recomputed", s.recompute_swiglu),
                                    (mlps, s.recompute_mlp),
                                    ("grad checkpoint", s.grad_checkpoint)) if on]
    return f"{size}{''.join(', ' + e for e in extras)}; {micro_per_epoch} per epoch"
