"""`lorakit train`: LoRA / DoRA / full fine-tuning with a compiled MLX step, checkpoints and exact resume.

One optimizer step = `grad_accumulation_steps` micro-batches. Each micro-batch adds the gradient of its
*summed* token loss; the update divides by the total number of loss tokens, so batch 4 and 2 x 2
accumulation make the same update (and a data-parallel all-sum would slot in at `_reduce`).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.lora import LoRALinear

from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.data.tokenized import Split, load_split, split_path
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model import distributed as dist
from lorakit.engine.model.adapters import ADAPTER_FILE, adapter_config, apply_adapters, save_adapter
from lorakit.engine.model.loading import load_model
from lorakit.engine.model.losses import batch_loss, loss_head
from lorakit.engine.reporter import Reporter
from lorakit.engine.training.loss_curve import write_loss_curve
from lorakit.errors import Interrupted, RunError, UserError
from lorakit.io import sha256_file, write_json
from lorakit.settings import TrainSettings, save_settings

METRICS = "metrics.jsonl"
REPORT = "report.json"
CURVE = "loss.svg"
SETTINGS_FILE = "lorakit.yaml"


@dataclass
class TrainResult:
    adapter_path: str
    adapter_file: str
    best_path: str | None
    steps: int
    epochs: float
    best_step: int | None
    best_val_loss: float | None
    initial_val_loss: float | None
    final_val_loss: float | None
    final_train_loss: float | None
    trained_tokens: int
    tokens_per_second: float
    peak_memory_gb: float
    wall_time_s: float
    stopped_early: bool
    resumed_from: str | None
    train_examples: int
    valid_examples: int
    truncated_examples: int
    trainable_parameters: int
    total_parameters: int
    metrics_file: str
    loss_curve: str
    report_file: str
    world_size: int = 1  # processes under mlx.launch (data-parallel ranks)


# ---------------------------------------------------------------- setup helpers


def _start_point(settings: TrainSettings, reporter: Reporter) -> tuple[Path | None, bool]:
    """Check --adapter-path against --resume/--resume-from/--overwrite.

    Returns the checkpoint to resume (or None) and whether the directory's old contents must be cleared.
    """
    out = settings.adapter_path
    if out.exists() and not out.is_dir():
        raise UserError(f"--adapter-path {out}: exists and is not a directory")
    if settings.resume_from is not None:
        problem = ckpt.problem(settings.resume_from) if settings.resume_from.is_dir() else "not a directory"
        if problem:
            raise UserError(f"--resume-from {settings.resume_from}: {problem}")
        return settings.resume_from, False
    has_files = out.is_dir() and any(out.iterdir())
    if settings.resume:
        found = ckpt.latest_valid(out, reporter)
        if found is None and has_files:
            raise UserError(f"--resume: no intact checkpoint under {out / ckpt.CHECKPOINTS}; "
                            "pass --overwrite to start over")
        if found is None:
            reporter.log(f"--resume: nothing to resume in {out}; starting a new run")
        return found, False
    if has_files and not settings.overwrite:
        raise UserError(f"--adapter-path {out}: directory is not empty; pass --resume to continue its run, "
                        "--overwrite to start over, or choose another --adapter-path")
    return None, has_files


def _clear(directory: Path) -> None:
    for child in directory.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _schedule(settings: TrainSettings, total_steps: int):
    """Learning rate for the update made at optimizer step `step` (0-based): warmup, then the schedule."""
    peak, floor = settings.learning_rate, settings.learning_rate * settings.min_lr_ratio
    warmup = settings.warmup if settings.warmup >= 1 else settings.warmup * total_steps
    warmup = min(round(warmup), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)

    def lr(step: mx.array) -> mx.array:
        n = step.astype(mx.float32) + 1  # the update being made, 1-based
        warm = mx.minimum(n / warmup, 1.0) if warmup else mx.array(1.0)
        progress = mx.clip((n - warmup) / decay_steps, 0.0, 1.0)
        if settings.lr_schedule == "cosine":
            value = floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * progress))
        elif settings.lr_schedule == "linear":
            value = peak - (peak - floor) * progress
        else:
            value = mx.array(peak)
        return warm * value

    return lr


def _optimizer(settings: TrainSettings, total_steps: int) -> optim.Optimizer:
    lr = _schedule(settings, total_steps)
    if settings.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    if settings.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=settings.weight_decay)
    return optim.Adafactor(learning_rate=lr, relative_step=False, scale_parameter=False)


def use_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (per model: the blocks get a subclass)."""
    subclasses: dict[type, type] = {}
    for block in model.layers:
        cls = type(block)
        if cls not in subclasses:
            call = cls.__call__

            def checkpointed(self, x, *args, _call=call, **kwargs):
                # only the hidden states are differentiated: fused attention has no gradient for a mask
                def inner(params, x):
                    self.update(params)
                    return _call(self, x, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), x)

            subclasses[cls] = type(cls.__name__, (cls,), {"__call__": checkpointed})
        block.__class__ = subclasses[cls]


class _MixedPrecisionLoRA(LoRALinear):
    """LoRALinear whose branch computes in the input's dtype; the adapter weights stay float32 (Adam's
    small updates need that). mlx-lm's version multiplies bf16/fp16 inputs by float32 weights, which
    makes (and keeps for the backward pass) a float32 copy of every adapted layer's input."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)


def use_mixed_precision_lora(model: nn.Module) -> None:
    """Switch the LoRA layers to _MixedPrecisionLoRA (same parameters, same saved adapters)."""
    for _, module in model.named_modules():
        if type(module) is LoRALinear:
            module.__class__ = _MixedPrecisionLoRA


def _param_counts(model: nn.Module) -> tuple[int, int]:
    from mlx_lm.utils import get_total_parameters

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return trainable, get_total_parameters(model)


def _global_norm(grad: Any) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grad)))


def _reduce(grad: Any, ntoks: mx.array) -> tuple[Any, mx.array]:
    """Combine gradient sums across data-parallel ranks: mean gradient over mean token count = sum over sum."""
    w = dist.world()
    if not w.is_distributed:
        return grad, ntoks
    return w.average_gradients(grad), w.sum(ntoks) / w.size


@contextmanager
def _deferred_interrupts(flag: dict):
    """Ctrl-C / SIGTERM set a flag the loop checks between steps; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _oom_error(e: BaseException, settings: TrainSettings, step: int) -> RunError:
    hints = [(f"--batch-size {max(1, settings.batch_size // 2)} --grad-accumulation-steps "
              f"{settings.grad_accumulation_steps * 2} (same effective batch)")]
    if not settings.grad_checkpoint:
        hints.append("--grad-checkpoint")
    hints.append(f"--max-seq-length {max(2, settings.max_seq_length // 2)}")
    if settings.num_layers < 0 or settings.num_layers > 8:
        hints.append("--num-layers 8")
    if settings.fine_tune_type == "full":
        hints.append("--fine-tune-type lora")
    if not settings.quantize:
        hints.append("--quantize 4")
    return RunError(f"out of memory at step {step} ({e}). Try: " + "; ".join(hints))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "memory" in str(e).lower() or "bad_alloc" in str(e)


# ---------------------------------------------------------------- the run


class _Metrics:
    """metrics.jsonl (append, one line per report/eval) plus the points for the loss curve."""

    def __init__(self, path: Path, resume_step: int | None, write: bool = True) -> None:
        self.path = path
        self.write = write
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["iteration"] <= resume_step:
                    kept.append(line)
                    self._remember(row)
        if write:
            path.write_text("".join(line + "\n" for line in kept))

    def _remember(self, row: dict) -> None:
        if row.get("train_loss") is not None:
            self.train.append((row["iteration"], row["train_loss"]))
        if row.get("val_loss") is not None:
            self.val.append((row["iteration"], row["val_loss"]))

    def add(self, row: dict) -> None:
        self._remember(row)
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def run(settings: TrainSettings, reporter: Reporter) -> TrainResult:
    wall_start = time.perf_counter()
    out = settings.adapter_path
    world = dist.world()  # under mlx.launch: this rank of the data-parallel group (else a group of one)
    reporter = world.reporter(reporter)
    dist.check_batch_size(settings.batch_size, world)
    resume_ckpt, clear = _start_point(settings, reporter)
    split_path(settings.data, "train")  # fail on a wrong --data before the (slow) model load
    loaded = load_model(settings, reporter)
    model = loaded.model
    head = loss_head(model)
    train_set = load_split(settings.data, "train", loaded.tokenizer, settings.train_on, settings.max_seq_length,
                           reporter)
    valid_set: Split | None = None
    if (Path(settings.data) / "valid.jsonl").exists():
        valid_set = load_split(settings.data, "valid", loaded.tokenizer, settings.train_on,
                               settings.max_seq_length, reporter)
    elif settings.early_stopping_patience:
        raise UserError(f"--early-stopping-patience needs a validation split: no valid.jsonl in {settings.data}")
    else:
        reporter.warn(f"no valid.jsonl in {settings.data}: no validation, no best/ checkpoint")

    mx.random.seed(settings.seed)
    lora_parameters = apply_adapters(model, settings)
    cfg = adapter_config(settings, loaded, lora_parameters)
    use_mixed_precision_lora(model)
    if settings.grad_checkpoint:
        use_grad_checkpoint(model)

    plan = BatchPlan(train_set.examples, settings.batch_size, settings.max_seq_length, pack=settings.pack,
                     seed=settings.seed)
    dist.shard_plan(plan, world, reporter, "train")
    micro_per_epoch = len(plan)
    steps_per_epoch = micro_per_epoch / settings.grad_accumulation_steps
    total_steps = settings.iters or max(1, math.ceil((settings.epochs or 3.0) * steps_per_epoch))
    val_batches = []
    if valid_set is not None:
        val_plan = BatchPlan(valid_set.examples, settings.batch_size, settings.max_seq_length, pack=settings.pack,
                             seed=settings.seed)
        dist.shard_plan(val_plan, world, reporter, "valid")
        order = val_plan.order(0)
        if settings.val_batches >= 0:
            order = order[: max(1, settings.val_batches)]
        val_batches = [val_plan.build(i).to_mx() for i in order]

    optimizer = _optimizer(settings, total_steps)
    optimizer.init(model.trainable_parameters())
    state = {"step": 0, "epoch": 0, "batch_index": 0, "trained_tokens": 0, "best_val_loss": None,
             "best_step": None, "evals_since_best": 0, "initial_val_loss": None, "elapsed": 0.0,
             "train_data_sha256": sha256_file(train_set.path), "seed": settings.seed, "world_size": world.size}
    if resume_ckpt is not None:
        dist.check_resume_world(resume_ckpt, world)
        saved = ckpt.load_checkpoint(resume_ckpt, model, optimizer)
        if saved.get("train_data_sha256") != state["train_data_sha256"]:
            reporter.warn(f"{train_set.path} changed since checkpoint {resume_ckpt}; resuming at the same "
                          "position in the new data")
        state.update({k: v for k, v in saved.items() if k != "train_data_sha256"})
        reporter.log(f"resuming from {resume_ckpt} (step {state['step']})")
        if state["step"] >= total_steps:
            reporter.warn(f"checkpoint step {state['step']} already reaches the {total_steps} steps asked for; "
                          "raise --iters or --epochs to train further")

    # A collective, so also a barrier: every rank has looked at --adapter-path before rank 0 writes into it.
    dist.check_same(world, {"step to resume from": state["step"], "number of train batches": len(plan)},
                    "every process must see the same --data and --adapter-path checkpoint (a shared folder, "
                    "or the same copy at the same path on every machine)")
    # Everything checked: only now touch --adapter-path (a bad flag or data file leaves it as it was).
    if world.is_main:
        if clear:
            _clear(out)
        out.mkdir(parents=True, exist_ok=True)
        save_settings(settings.model_copy(update={"resume": False, "overwrite": False, "resume_from": None}),
                      out / SETTINGS_FILE)
    trainable, total = _param_counts(model)
    scale = settings.lora_scale
    reporter.table("lorakit train", [
        ("model", f"{loaded.name} ({loaded.source}{', quantized' if 'quantization' in loaded.config else ''})"),
        ("fine-tune", settings.fine_tune_type if settings.fine_tune_type == "full" else
         f"{settings.fine_tune_type} rank {settings.lora_rank}, alpha {settings.lora_alpha:g}, scale {scale:g}, "
         f"{len(lora_parameters.get('keys', []))} module kinds"),
        ("trainable", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"),
        ("train data", (f"{len(train_set.examples)} examples ({train_set.format}, --train-on "
                        f"{train_set.train_on}), {train_set.tokens:,} tokens, {train_set.loss_tokens:,} trained")),
        ("valid data", f"{len(valid_set.examples)} examples, {len(val_batches)} batches per eval"
         if valid_set else "none"),
        ("batches", (f"{settings.batch_size} x {settings.grad_accumulation_steps} accumulation = "
                     f"{settings.batch_size * settings.grad_accumulation_steps} effective"
                     f"{', packed' if settings.pack else ''}; {micro_per_epoch} per epoch")),
        ("steps", (f"{total_steps} ({total_steps / steps_per_epoch:.2f} epochs), lr {settings.learning_rate:g} "
                   f"{settings.lr_schedule}, {settings.optimizer}")),
    ])
    with dist.lost_rank_errors(world):
        return _train(settings, reporter, loaded, model, head, cfg, plan, val_batches, optimizer, state,
                      total_steps, steps_per_epoch, resume_ckpt, wall_start,
                      {"train": len(train_set.examples), "valid": len(valid_set.examples) if valid_set else 0,
                       "truncated": train_set.truncated + (valid_set.truncated if valid_set else 0),
                       "trainable": trainable, "total": total})


def _train(settings, reporter, loaded, model, head, cfg, plan, val_batches, optimizer, state, total_steps,
           steps_per_epoch, resume_ckpt, wall_start, sizes) -> TrainResult:
    out = settings.adapter_path
    accum = settings.grad_accumulation_steps
    world = dist.world()
    metrics = _Metrics(out / METRICS, state["step"] if resume_ckpt else None, write=world.is_main)
    loss_and_grad = nn.value_and_grad(model, partial(batch_loss, head=head))
    compiled_state = [model.state, optimizer.state, mx.random.state]

    def update(grad, ntoks):
        grad, ntoks = _reduce(grad, ntoks)
        grad = tree_map(lambda g: g / ntoks, grad)
        if settings.max_grad_norm:
            grad, norm = optim.clip_grad_norm(grad, settings.max_grad_norm)
        else:
            norm = _global_norm(grad)
        optimizer.update(model, grad)
        return norm

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def micro_step(batch, grad_sum):  # forward + backward, gradient summed into grad_sum
        (loss_sum, ntoks), grad = loss_and_grad(model, batch)
        if grad_sum is not None:
            grad = tree_map(mx.add, grad, grad_sum)
        return loss_sum, ntoks, grad

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def apply_update(grad, ntoks):
        return update(grad, ntoks)

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def full_step(batch):  # no accumulation: forward, backward and update in one graph
        (loss_sum, ntoks), grad = loss_and_grad(model, batch)
        return loss_sum, ntoks, update(grad, ntoks)

    def evaluate() -> float:
        model.eval()
        loss_sum = ntoks = 0.0
        for b in val_batches:
            l, n = batch_loss(model, b, head)  # eager: a compile per validation shape costs more than it saves
            mx.eval(l, n)
            loss_sum, ntoks = loss_sum + l.item(), ntoks + n.item()
            beat()
        model.train()
        loss_sum, ntoks = world.sum_floats(loss_sum, ntoks)
        return loss_sum / ntoks

    def epoch_of() -> float:
        return round((state["epoch"] * len(plan) + state["batch_index"]) / len(plan), 4)

    prior_elapsed = state["elapsed"]  # wall time of the run before this resume

    def elapsed() -> float:
        return prior_elapsed + time.perf_counter() - wall_start

    def save() -> Path:
        state["elapsed"] = elapsed()
        if not world.is_main:
            return out
        path = ckpt.save_checkpoint(out, model, optimizer, cfg, dict(state), settings.keep_last)
        reporter.on_save(str(path), state["step"])
        return path

    def run_eval() -> float:
        tic = time.perf_counter()
        val_loss = evaluate()
        row = {"iteration": state["step"], "epoch": epoch_of(), "val_loss": val_loss,
               "val_time": time.perf_counter() - tic, "elapsed": elapsed()}
        if state["step"] == 0:
            state["initial_val_loss"] = val_loss
        elif state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_step=state["step"], evals_since_best=0)
            if world.is_main:
                ckpt.save_best(out, model, cfg, {"step": state["step"], "val_loss": val_loss})
            reporter.on_save(str(out / ckpt.BEST), state["step"])
        else:
            state["evals_since_best"] += 1
        row["best_val_loss"] = state["best_val_loss"]
        metrics.add(row)
        reporter.on_eval(row)
        if world.is_main:
            write_loss_curve(out / CURVE, metrics.train, metrics.val, state["best_step"], f"{loaded.name}")
        return val_loss

    model.train()
    flag: dict = {}
    batches = plan.iterate(state["epoch"], state["batch_index"])
    window = {"loss": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
    last = {"train_loss": None, "val_loss": None, "tokens_per_second": None}
    last_saved = state["step"] if resume_ckpt else None
    stopped_early = False
    in_step = False
    reporter.start("train", total=total_steps)
    reporter.advance(state["step"])
    try:
        with _deferred_interrupts(flag), dist.watchdog(world, settings.dist_timeout) as beat:
            if val_batches and state["step"] == 0:
                last["val_loss"] = run_eval()
            while state["step"] < total_steps:
                tic = time.perf_counter()
                in_step = True
                # The RNG (dropout) follows from (seed, step) alone, so a resumed run draws the same numbers.
                mx.random.seed((settings.seed * 1_000_003 + state["step"]) % 2**63)
                loss_sum = ntoks = 0.0
                grad = tok_sum = None
                for micro in range(accum):
                    epoch, index, batch = next(batches)
                    arrays = batch.to_mx()
                    if accum == 1:
                        l, n, norm = full_step(arrays)
                        mx.eval(compiled_state, l, n, norm)
                    else:
                        l, n, grad = micro_step(arrays, grad)
                        tok_sum = n if tok_sum is None else tok_sum + n
                        if micro == accum - 1:
                            norm = apply_update(grad, tok_sum)
                            mx.eval(compiled_state, l, tok_sum, norm)
                        else:
                            mx.eval(grad, l, tok_sum)
                    loss_sum, ntoks = loss_sum + l.item(), ntoks + n.item()
                    state["epoch"], state["batch_index"] = (epoch, index + 1) if index + 1 < len(plan) else (
                        epoch + 1, 0)
                grad_norm = norm.item()
                # Totals over all ranks; a Ctrl-C seen by any rank stops all of them after the same step.
                loss_sum, ntoks, stops = world.sum_floats(loss_sum, ntoks, float(bool(flag.get("stop"))))
                state["step"] += 1
                beat()
                in_step = False
                if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                    raise _nonfinite_error(settings, state["step"], loss_sum / max(ntoks, 1), grad_norm,
                                           last_saved, out)
                state["trained_tokens"] += int(ntoks)
                window["loss"] += loss_sum
                window["tokens"] += int(ntoks)
                window["time"] += time.perf_counter() - tic
                window["steps"] += 1
                step = state["step"]
                if step % settings.steps_per_report == 0 or step == total_steps:
                    last["train_loss"] = window["loss"] / max(window["tokens"], 1)
                    row = {"iteration": step, "epoch": epoch_of(), "train_loss": last["train_loss"],
                           "learning_rate": optimizer.learning_rate.item(),
                           "iterations_per_second": window["steps"] / window["time"],
                           "tokens_per_second": window["tokens"] / window["time"],
                           "trained_tokens": state["trained_tokens"], "peak_memory": mx.get_peak_memory() / 1e9,
                           "grad_norm": grad_norm, "elapsed": elapsed()}
                    last["tokens_per_second"] = row["tokens_per_second"]
                    metrics.add(row)
                    reporter.on_train_report(row)
                    window = {"loss": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
                if val_batches and (step % settings.steps_per_eval == 0 or step == total_steps):
                    last["val_loss"] = run_eval()
                    patience = settings.early_stopping_patience
                    if patience and state["evals_since_best"] >= patience:
                        stopped_early = True
                if step % settings.save_every == 0 or step == total_steps or stopped_early:
                    save()
                    last_saved = step
                reporter.advance(1, epoch=epoch_of(), loss=last["train_loss"], val_loss=last["val_loss"],
                                 lr=optimizer.learning_rate.item(), tok_s=last["tokens_per_second"],
                                 mem_gb=round(mx.get_peak_memory() / 1e9, 3))
                if stopped_early:
                    reporter.log(f"early stopping at step {step}: {settings.early_stopping_patience} evaluations "
                                 f"without improvement (best {state['best_val_loss']:.4f} at step "
                                 f"{state['best_step']})")
                    break
                if stops if world.is_distributed else flag.get("stop"):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        reporter.finish()
        resume = f"lorakit train --config {out / SETTINGS_FILE} --resume"
        if in_step:
            where = f"the newest checkpoint is step {last_saved}" if last_saved else "no checkpoint was saved"
            raise Interrupted(f"stopped inside step {state['step'] + 1} (abandoned); {where}. "
                              f"Resume with: {resume}") from None
        if state["step"] == 0:
            raise Interrupted("stopped before the first step; nothing to save. Run the same command again "
                              "to start over (with --overwrite)") from None
        if last_saved != state["step"]:
            save()
        raise Interrupted(f"saved checkpoint at step {state['step']}. Resume with: {resume}") from None
    except (MemoryError, RuntimeError) as e:
        if _is_oom(e):
            raise _oom_error(e, settings, state["step"] + 1) from None
        raise
    reporter.finish()

    if world.is_main:
        save_adapter(model, out, cfg)
        reporter.on_save(str(out / ADAPTER_FILE), state["step"])
        write_loss_curve(out / CURVE, metrics.train, metrics.val, state["best_step"], f"{loaded.name}")
    wall = elapsed()
    best_dir = out / ckpt.BEST
    result = TrainResult(
        adapter_path=str(out), adapter_file=str(out / ADAPTER_FILE),
        best_path=str(best_dir) if best_dir.exists() else None,
        steps=state["step"], epochs=round(state["step"] / steps_per_epoch, 4),
        best_step=state["best_step"], best_val_loss=state["best_val_loss"],
        initial_val_loss=state["initial_val_loss"], final_val_loss=last["val_loss"],
        final_train_loss=last["train_loss"], trained_tokens=state["trained_tokens"],
        tokens_per_second=round(state["trained_tokens"] / max(wall, 1e-9), 2),
        peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4), wall_time_s=round(wall, 3),
        stopped_early=stopped_early, resumed_from=str(resume_ckpt) if resume_ckpt else None,
        train_examples=sizes["train"], valid_examples=sizes["valid"], truncated_examples=sizes["truncated"],
        trainable_parameters=sizes["trainable"], total_parameters=sizes["total"],
        metrics_file=str(out / METRICS), loss_curve=str(out / CURVE), report_file=str(out / REPORT),
        world_size=world.size)
    if world.is_main:
        write_json(out / REPORT, asdict(result))
    reporter.table("training summary", [
        ("steps", f"{result.steps} ({result.epochs:g} epochs){' - stopped early' if stopped_early else ''}"),
        ("val loss", (f"{_fmt(result.initial_val_loss)} -> {_fmt(result.final_val_loss)} "
                      f"(best {_fmt(result.best_val_loss)} at step {result.best_step})")),
        ("train loss", _fmt(result.final_train_loss)),
        ("tokens", f"{result.trained_tokens:,} trained, {result.tokens_per_second:,.1f}/s overall"),
        ("peak memory", f"{result.peak_memory_gb:.3f} GB"),
        ("wall time", f"{result.wall_time_s:.1f} s"),
    ])
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _nonfinite_error(settings: TrainSettings, step: int, loss: float, grad_norm: float, last_saved: int | None,
                     out: Path) -> RunError:
    where = (f"the last good checkpoint is {ckpt.checkpoint_dir(out, last_saved)} (resume with --resume)"
             if last_saved else "no checkpoint had been saved yet")
    tips = [f"a lower --learning-rate (now {settings.learning_rate:g})", "--max-grad-norm 1.0",
            "--warmup 0.05"]
    if settings.dtype == "float16" or settings.dtype is None:
        tips.append("--dtype float32 or bfloat16 (float16 overflows easily)")
    return RunError(f"step {step}: the loss or gradients are not finite (loss {loss}, gradient norm {grad_norm}). "
                    "Likely causes: a learning rate too high, float16 overflow, or a broken base model. "
                    f"Try {', '.join(tips)}. Nothing from this step was saved; {where}.")
