"""The training loop: step -> report -> eval -> save, until the last step, an early stop or a Ctrl-C."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model import distributed as dist
from lorakit.engine.model.adapters import ADAPTER_FILE, save_adapter
from lorakit.engine.model.loading import LoadedModel
from lorakit.engine.reporter import Reporter
from lorakit.engine.training import failures
from lorakit.engine.training.layout import Layout
from lorakit.engine.training.loss_curve import write_loss_curve
from lorakit.engine.training.metrics_log import MetricsLog
from lorakit.engine.training.objective import Objective
from lorakit.engine.training.output import RunOutput
from lorakit.engine.training.result import CURVE, METRICS, REPORT, SETTINGS_FILE, RunSizes, TrainResult
from lorakit.engine.training.state import LastSeen, ReportWindow, TrainState
from lorakit.engine.training.steps import compile_steps
from lorakit.engine.training.warmup import Warmup
from lorakit.errors import Interrupted, RunError
from lorakit.io import write_json
from lorakit.settings import TrainSettings


@dataclass
class Batches:
    """The run's train batches (in a fixed order per epoch), its validation batches and its length."""

    plan: BatchPlan
    val: list[dict]  # the same batches at every evaluation
    total_steps: int
    steps_per_epoch: float


class Trainer:
    """One training run: the model and optimizer, where the run is (TrainState), and what it writes."""

    def __init__(self, settings: TrainSettings, reporter: Reporter, *, world: dist.World, loaded: LoadedModel,
                 head: str | None, adapter_cfg: dict, optimizer: optim.Optimizer, batches: Batches,
                 state: TrainState, sizes: RunSizes, resumed_from: Path | None, wall_start: float,
                 output: RunOutput, objective: Objective) -> None:
        self.settings, self.reporter, self.world = settings, reporter, world
        self.model, self.model_name, self.head = loaded.model, loaded.name, head
        self.adapter_cfg = adapter_cfg
        self.optimizer, self.batches, self.state, self.sizes = optimizer, batches, state, sizes
        self.resumed_from, self.wall_start = resumed_from, wall_start
        self.output = output
        self.prior_elapsed = state.elapsed  # wall time of the run before this resume
        resume_step = state.step if resumed_from else None
        self.metrics = MetricsLog(self.out / METRICS, resume_step, write=world.is_main, warn=reporter.warn)
        self.objective = objective
        self.steps = compile_steps(self.model, optimizer, objective.loss, settings.max_grad_norm)
        # the objective's metric sums (DPO rewards...) over the step and since the last report
        self.step_stats: np.ndarray = np.zeros(0)
        self.window_stats: np.ndarray | float = 0.0
        self.accuracy: float | None = None  # DPO/ORPO: the last reported validation (or train) reward accuracy
        self.train_batches = batches.plan.iterate(state.epoch, state.batch_index)
        self.window, self.last = ReportWindow(), LastSeen()
        self.warmup, self.compiling = Warmup(), False
        self.resume_step = self.last_saved = state.step if resumed_from else None
        # The newest checkpoint is unverified until a step has run on its weights with a finite loss and
        # gradient; till then the one before it is kept too, and an --overwrite run stays staged.
        self.unverified = False
        self.last_batch: dict | None = None
        self.grad_norm = 0.0
        self.stop = failures.StopRequest()
        self.stops_everywhere = 0.0  # stop requests summed over the ranks at the last step
        self.in_step = self.stopped_early = False
        self.beat = lambda: None  # the watchdog's, while the loop runs

    @property
    def out(self) -> Path:
        """Where this run writes now (its staging directory until an --overwrite run is published)."""
        return self.output.path

    def train(self) -> TrainResult:
        """Train to the last step or an early stop; then write the adapter, loss curve and report.json."""
        self.model.train()
        if self.resumed_from is not None and self.world.is_main:
            self._write_curve()  # the resumed run's curve, before any new point
        self.reporter.start("train", total=self.batches.total_steps)
        self.reporter.advance(self.state.step)
        watchdog = dist.watchdog(self.world, self.settings.dist_timeout)
        try:
            with failures.deferred_interrupts(self.stop), watchdog as beat:
                self.beat = beat
                self._loop()
        except KeyboardInterrupt:
            raise self.on_interrupt() from None
        except (MemoryError, RuntimeError) as e:
            if failures.is_oom(e):
                raise failures.oom_error(e, self.settings, self.state.step + 1,
                                         [x.length for x in self.batches.plan.examples]) from None
            raise
        self.reporter.finish()
        return self._finish()

    def _loop(self) -> None:
        s, total = self.settings, self.batches.total_steps
        if self.batches.val and self.state.step == 0:
            self.validate()
        while self.state.step < total:
            self.step()
            step = self.state.step
            if step % s.steps_per_report == 0 or step == total:
                self.report()
            if self.batches.val and (step % s.steps_per_eval == 0 or step == total):
                self.validate()
                if s.early_stopping_patience and self.state.evals_since_best >= s.early_stopping_patience:
                    self.stopped_early = True
            elif step == total:
                self._check_final_weights()
            if step % s.save_every == 0 or step == total or self.stopped_early:
                self.save()
            self._show_progress()
            if self.stopped_early:
                self.reporter.log(f"early stopping at step {step}: {s.early_stopping_patience} evaluations "
                                  f"without improvement (best {self.state.best_val_loss:.4f} at step "
                                  f"{self.state.best_step})")
                return
            if self.stops_everywhere if self.world.is_distributed else self.stop.requested:
                raise KeyboardInterrupt

    def step(self) -> None:
        """One optimizer step; stops the run if its loss, gradient or updated weights are not finite."""
        tic = time.perf_counter()
        self.in_step = True
        # The RNG (dropout) follows from (seed, step) alone, so a resumed run draws the same numbers.
        mx.random.seed((self.settings.seed * 1_000_003 + self.state.step) % 2**63)
        self.compiling = False
        loss_sum, ntoks, tokens, grad_norm, nonfinite = self._micro_batches()
        if self.compiling:
            self.reporter.phase(None)
        # Totals over all ranks; a Ctrl-C seen by any rank stops all of them after the same step.
        loss_sum, ntoks, tokens, self.stops_everywhere = self.world.sum_floats(loss_sum, ntoks, tokens,
                                                                               float(self.stop.requested))
        if self.step_stats.size:
            self.window_stats = self.window_stats + np.array(self.world.sum_floats(*self.step_stats))
        self.state.step += 1
        self.beat()
        self.in_step = False
        self._check_step(loss_sum / max(ntoks, 1), grad_norm, nonfinite)
        self.state.trained_tokens += int(tokens)
        self.grad_norm = grad_norm
        self.window.add(loss_sum, ntoks, int(tokens), time.perf_counter() - tic)
        self.warmup.add(time.perf_counter() - tic, int(tokens), self.compiling)

    def _micro_batches(self) -> tuple[float, float, float, float, int]:
        """Forward and backward over the step's micro-batches, then the update.

        Returns (loss sum, what it sums over (tokens, or pairs), loss-bearing tokens, gradient norm, weight
        tensors the update made non-finite)."""
        steps, accum = self.steps, self.settings.grad_accumulation_steps
        loss_sum = ntoks = tokens = 0.0
        grad = tok_sum = None
        self.step_stats = np.zeros(0)
        for micro in range(accum):
            epoch, index, batch = next(self.train_batches)
            arrays = self.last_batch = batch.to_mx()
            if self.warmup.is_new(arrays):
                self.compiling = True
                self.reporter.phase("compiling")
            if accum == 1:
                loss, n, stats, norm, bad = steps.full(arrays)
                mx.eval(steps.state, loss, n, stats, norm, bad)
            else:
                loss, n, stats, grad = steps.micro(arrays, grad)
                tok_sum = n if tok_sum is None else tok_sum + n
                if micro == accum - 1:
                    norm, bad = steps.apply(grad, tok_sum)
                    mx.eval(steps.state, loss, tok_sum, stats, norm, bad)
                else:
                    mx.eval(grad, loss, tok_sum, stats)
            loss_sum, ntoks, tokens = loss_sum + loss.item(), ntoks + n.item(), tokens + batch.loss_tokens
            step_stats = np.array(stats, np.float64)
            self.step_stats = step_stats if micro == 0 else self.step_stats + step_stats
            self.state.move_past(epoch, index, len(self.batches.plan))
        return loss_sum, ntoks, tokens, norm.item(), bad.item()

    def _check_step(self, loss: float, grad_norm: float, nonfinite: int) -> None:
        """Stop at a non-finite step; a finite one verifies the newest checkpoint (its weights gave a finite
        loss and gradient)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._blow_up(f"the loss or gradients are not finite (loss {loss}, gradient norm "
                                f"{grad_norm})", started_bad=True)
        if nonfinite:
            raise self._blow_up(f"the update made {nonfinite} trainable weight tensor(s) NaN or inf (loss "
                                f"{loss:.4g}, gradient norm {grad_norm:.4g})", started_bad=False)
        if self.unverified:
            self._verified()

    def _blow_up(self, what: str, started_bad: bool) -> RunError:
        """The error that ends the run at a non-finite step.

        `started_bad`: the loss or gradient computed on the weights the step started from was not finite. If
        those weights are the newest checkpoint, resuming it would fail the same way: it is marked suspect.
        """
        step, newest, staged = self.state.step, self.last_saved, self.output.staging is not None
        suspect = None
        if started_bad and newest is not None and newest == step - 1:
            suspect = ckpt.checkpoint_dir(self.out, newest)
            if newest == self.resume_step and Path(self.resumed_from).resolve() != suspect.resolve():
                suspect = None  # a --resume-from outside --adapter-path: not ours to mark
            elif self.world.is_main and not staged and suspect.is_dir():
                ckpt.mark_suspect(suspect, f"the loss or gradient computed on its weights at step {step} was "
                                           "not finite")
            newest -= 1
        return failures.nonfinite_error(self.settings, step, what, out=self.out, staged=staged,
                                        suspect=None if staged else suspect,
                                        last_good=self._last_good(newest))

    def _last_good(self, limit: int | None) -> Path | None:
        """The newest checkpoint up to step `limit` that is not marked suspect."""
        if limit is None:
            return None
        found = [(int(p.name.split("-")[1]), p) for p in ckpt.list_checkpoints(self.out)]
        if self.resumed_from is not None:
            found.append((self.resume_step, Path(self.resumed_from)))
        good = [(n, p) for n, p in found if n <= limit and ckpt.suspect_reason(p) is None]
        return max(good)[1] if good else None

    def _check_final_weights(self) -> None:
        """Without validation no loss is ever computed on the last update's weights: one forward pass over the
        last batch checks them before they are saved."""
        self.model.eval()
        loss, n, _ = self.objective.loss(self.model, self.last_batch)
        mx.eval(loss, n)
        self.model.train()
        loss_sum, ntoks = self.world.sum_floats(loss.item(), n.item())
        if not math.isfinite(loss_sum):
            raise self._blow_up(f"the loss on the final weights is not finite ({loss_sum / max(ntoks, 1)})",
                                started_bad=False)

    def _verified(self) -> None:
        """A step ran on the newest checkpoint's weights with a finite loss and gradient: it is a good one."""
        self.unverified = False
        if self.world.is_main and self.settings.keep_last < 2:
            ckpt.prune(self.out, self.settings.keep_last)
        self._publish()

    def _publish(self) -> None:
        """An --overwrite run takes the place of the old --adapter-path (it has a checkpoint to keep)."""
        if self.world.is_main and self.output.publish():
            self.metrics.path = self.out / METRICS
            self.reporter.log(f"--overwrite: {self.out} now holds this run; its previous contents are gone")

    def report(self) -> None:
        """A train row for the steps since the last one: metrics.jsonl and the reporter."""
        w = self.window
        self.last.train_loss = w.loss / max(w.count, 1)
        row = {"iteration": self.state.step, "epoch": self._epoch(), "train_loss": self.last.train_loss,
               "learning_rate": self.optimizer.learning_rate.item(),
               "iterations_per_second": w.steps / w.time, "tokens_per_second": w.tokens / w.time,
               "trained_tokens": self.state.trained_tokens, "peak_memory": mx.get_peak_memory() / 1e9,
               "grad_norm": self.grad_norm, "elapsed": self.elapsed(),
               **self.objective.metrics(self.window_stats, w.count)}
        self.window_stats = 0.0
        self.accuracy = row.get("reward_accuracy", self.accuracy)
        self.last.tokens_per_second = row["tokens_per_second"]
        self.metrics.add(row)
        self.reporter.on_train_report(row)
        self.window = ReportWindow()
        if self.world.is_main:
            self._write_curve()

    def validate(self) -> float:
        """Validation loss now; updates the best (and best/), metrics.jsonl and the loss curve."""
        tic = time.perf_counter()
        val_loss, val_metrics = self._val_loss()
        if not math.isfinite(val_loss):  # never reported, never best/
            untrained = " of the untrained model" if self.state.step == 0 else ""
            raise self._blow_up(f"the validation loss{untrained} is not finite ({val_loss})",
                                started_bad=False)
        row = {"iteration": self.state.step, "epoch": self._epoch(), "val_loss": val_loss,
               "val_time": time.perf_counter() - tic, "elapsed": self.elapsed(), **val_metrics}
        self._track_best(val_loss)
        row["best_val_loss"] = self.state.best_val_loss
        self.metrics.add(row)
        self.reporter.on_eval(row)
        if self.world.is_main:
            self._write_curve()
        self.last.val_loss = val_loss
        self.accuracy = row.get("val_reward_accuracy", self.accuracy)
        return val_loss

    def _val_loss(self) -> tuple[float, dict[str, float]]:
        """The validation loss (per token, or per pair for DPO/ORPO) and the objective's metrics."""
        self.model.eval()
        loss_sum = ntoks = 0.0
        stats: np.ndarray | float = 0.0
        for b in self.batches.val:
            # eager: a compile per validation shape costs more
            loss, n, batch_stats = self.objective.loss(self.model, b)
            mx.eval(loss, n, batch_stats)
            loss_sum, ntoks = loss_sum + loss.item(), ntoks + n.item()
            stats = stats + np.array(batch_stats, np.float64)
            self.beat()
        self.model.train()
        loss_sum, ntoks, *stats = self.world.sum_floats(loss_sum, ntoks, *stats)
        return loss_sum / ntoks, self.objective.metrics(stats, ntoks, prefix="val_")

    def _track_best(self, val_loss: float) -> None:
        st = self.state
        if st.step == 0:
            st.initial_val_loss = val_loss
        elif st.best_val_loss is None or val_loss < st.best_val_loss:
            st.best_val_loss, st.best_step, st.evals_since_best = val_loss, st.step, 0
            if self.world.is_main:
                info = {"step": st.step, "val_loss": val_loss}
                ckpt.save_best(self.out, self.model, self.adapter_cfg, info)
            self.reporter.on_save(str(self.out / ckpt.BEST), st.step)
        else:
            st.evals_since_best += 1

    def save(self) -> None:
        """A checkpoint of this step (written by rank 0)."""
        self.state.elapsed = self.elapsed()
        if self.world.is_main:
            # the checkpoint before stays too until this one is verified (see _verified)
            path = ckpt.save_checkpoint(self.out, self.model, self.optimizer, self.adapter_cfg,
                                        self.state.to_dict(), max(self.settings.keep_last, 2))
            self.reporter.on_save(str(path), self.state.step)
        self.last_saved = self.state.step
        self.unverified = True

    def on_interrupt(self) -> Interrupted:
        """After Ctrl-C: save the last finished step unless it is saved already, and say how to resume."""
        self.reporter.finish()
        step = self.state.step
        if not self.in_step and self.window.steps:
            self.report()  # a row for the steps since the last one: metrics.jsonl and loss.svg end at `step`
        if not self.in_step and step and self.last_saved != step:
            self.save()
        if self.world.is_main:
            self._write_curve()
        if self.last_saved is None:
            where = f"inside step {step + 1} (abandoned)" if self.in_step else "before the first step"
            return Interrupted(f"stopped {where}; nothing was saved. Run the same command again to start "
                               "over (with --overwrite)")
        self._publish()  # the resume command below must find its checkpoint in --adapter-path
        resume = f"lorakit train --config {self.out / SETTINGS_FILE} --resume"
        if self.in_step:
            return Interrupted(f"stopped inside step {step + 1} (abandoned); the newest checkpoint is step "
                               f"{self.last_saved}. Resume with: {resume}")
        return Interrupted(f"saved checkpoint at step {step}. Resume with: {resume}")

    def _finish(self) -> TrainResult:
        """The final adapter, loss curve and report.json, and the summary table."""
        if self.world.is_main:
            save_adapter(self.model, self.out, self.adapter_cfg)
            self.reporter.on_save(str(self.out / ADAPTER_FILE), self.state.step)
            self._write_curve()
            ckpt.prune(self.out, self.settings.keep_last)  # the last weights passed their check
        result = self.result()
        if self.world.is_main:
            write_json(self.out / REPORT, asdict(result))
        self._publish()
        self.reporter.table("training summary", result.summary_rows())
        return result

    def result(self) -> TrainResult:
        st, out, wall = self.state, self.output.final, self.elapsed()  # paths once the run is in place
        return TrainResult(
            adapter_path=str(out), adapter_file=str(out / ADAPTER_FILE),
            best_path=str(out / ckpt.BEST) if (self.out / ckpt.BEST).exists() else None,
            steps=st.step, epochs=round(st.step / self.batches.steps_per_epoch, 4),
            best_step=st.best_step, best_val_loss=st.best_val_loss, initial_val_loss=st.initial_val_loss,
            final_val_loss=self.last.val_loss, final_train_loss=self.last.train_loss,
            trained_tokens=st.trained_tokens, tokens_per_second=round(st.trained_tokens / max(wall, 1e-9), 2),
            peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4), wall_time_s=round(wall, 3),
            stopped_early=self.stopped_early,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            metrics_file=str(out / METRICS), loss_curve=str(out / CURVE), report_file=str(out / REPORT),
            world_size=self.world.size, warmup_s=round(self.warmup.seconds, 3),
            compiled_shapes=len(self.warmup.seen), steady_tokens_per_second=self._steady_speed(),
            layout=Layout.of(self.settings).flags(), **asdict(self.sizes))

    def _steady_speed(self) -> float | None:
        speed = self.warmup.steady_tokens_per_second
        return None if speed is None else round(speed, 2)

    def elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self.wall_start

    def _epoch(self) -> float:
        return self.state.epoch_progress(len(self.batches.plan))

    def _show_progress(self) -> None:
        self.reporter.advance(1, epoch=self._epoch(), loss=self.last.train_loss, val_loss=self.last.val_loss,
                              acc=self.accuracy, lr=self.optimizer.learning_rate.item(),
                              tok_s=self.last.tokens_per_second,
                              mem_gb=round(mx.get_peak_memory() / 1e9, 3))

    def _write_curve(self) -> None:
        write_loss_curve(self.out / CURVE, self.metrics.train, self.metrics.val, self.state.best_step,
                         self.model_name)
