"""The training loop: step -> report -> eval -> save, until the last step, an early stop or a Ctrl-C."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim

from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model import distributed as dist
from lorakit.engine.model.adapters import ADAPTER_FILE, save_adapter
from lorakit.engine.model.loading import LoadedModel
from lorakit.engine.model.losses import batch_loss
from lorakit.engine.reporter import Reporter
from lorakit.engine.training import failures
from lorakit.engine.training.loss_curve import write_loss_curve
from lorakit.engine.training.metrics_log import MetricsLog
from lorakit.engine.training.result import CURVE, METRICS, REPORT, SETTINGS_FILE, RunSizes, TrainResult
from lorakit.engine.training.state import LastSeen, ReportWindow, TrainState
from lorakit.engine.training.steps import compile_steps
from lorakit.errors import Interrupted
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
                 state: TrainState, sizes: RunSizes, resumed_from: Path | None, wall_start: float) -> None:
        self.settings, self.reporter, self.world = settings, reporter, world
        self.model, self.model_name, self.head = loaded.model, loaded.name, head
        self.adapter_cfg = adapter_cfg
        self.optimizer, self.batches, self.state, self.sizes = optimizer, batches, state, sizes
        self.resumed_from, self.wall_start = resumed_from, wall_start
        self.out = settings.adapter_path
        self.prior_elapsed = state.elapsed  # wall time of the run before this resume
        resume_step = state.step if resumed_from else None
        self.metrics = MetricsLog(self.out / METRICS, resume_step, write=world.is_main)
        self.steps = compile_steps(self.model, optimizer, head, settings.max_grad_norm)
        self.train_batches = batches.plan.iterate(state.epoch, state.batch_index)
        self.window, self.last = ReportWindow(), LastSeen()
        self.last_saved = state.step if resumed_from else None
        self.grad_norm = 0.0
        self.stop = failures.StopRequest()
        self.stops_everywhere = 0.0  # stop requests summed over the ranks at the last step
        self.in_step = self.stopped_early = False
        self.beat = lambda: None  # the watchdog's, while the loop runs

    def train(self) -> TrainResult:
        """Train to the last step or an early stop; then write the adapter, loss curve and report.json."""
        self.model.train()
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
                raise failures.oom_error(e, self.settings, self.state.step + 1) from None
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
        """One optimizer step; stops the run if its loss or gradient is not finite."""
        tic = time.perf_counter()
        self.in_step = True
        # The RNG (dropout) follows from (seed, step) alone, so a resumed run draws the same numbers.
        mx.random.seed((self.settings.seed * 1_000_003 + self.state.step) % 2**63)
        loss_sum, ntoks, grad_norm = self._micro_batches()
        # Totals over all ranks; a Ctrl-C seen by any rank stops all of them after the same step.
        loss_sum, ntoks, self.stops_everywhere = self.world.sum_floats(loss_sum, ntoks,
                                                                       float(self.stop.requested))
        self.state.step += 1
        self.beat()
        self.in_step = False
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            raise failures.nonfinite_error(self.settings, self.state.step, loss_sum / max(ntoks, 1),
                                           grad_norm, self.last_saved, self.out)
        self.state.trained_tokens += int(ntoks)
        self.grad_norm = grad_norm
        self.window.add(loss_sum, int(ntoks), time.perf_counter() - tic)

    def _micro_batches(self) -> tuple[float, float, float]:
        """Forward and backward over the step's micro-batches, then the update; (loss sum, tokens, norm)."""
        steps, accum = self.steps, self.settings.grad_accumulation_steps
        loss_sum = ntoks = 0.0
        grad = tok_sum = None
        for micro in range(accum):
            epoch, index, batch = next(self.train_batches)
            arrays = batch.to_mx()
            if accum == 1:
                l, n, norm = steps.full(arrays)
                mx.eval(steps.state, l, n, norm)
            else:
                l, n, grad = steps.micro(arrays, grad)
                tok_sum = n if tok_sum is None else tok_sum + n
                if micro == accum - 1:
                    norm = steps.apply(grad, tok_sum)
                    mx.eval(steps.state, l, tok_sum, norm)
                else:
                    mx.eval(grad, l, tok_sum)
            loss_sum, ntoks = loss_sum + l.item(), ntoks + n.item()
            self.state.move_past(epoch, index, len(self.batches.plan))
        return loss_sum, ntoks, norm.item()

    def report(self) -> None:
        """A train row for the steps since the last one: metrics.jsonl and the reporter."""
        w = self.window
        self.last.train_loss = w.loss / max(w.tokens, 1)
        row = {"iteration": self.state.step, "epoch": self._epoch(), "train_loss": self.last.train_loss,
               "learning_rate": self.optimizer.learning_rate.item(),
               "iterations_per_second": w.steps / w.time, "tokens_per_second": w.tokens / w.time,
               "trained_tokens": self.state.trained_tokens, "peak_memory": mx.get_peak_memory() / 1e9,
               "grad_norm": self.grad_norm, "elapsed": self.elapsed()}
        self.last.tokens_per_second = row["tokens_per_second"]
        self.metrics.add(row)
        self.reporter.on_train_report(row)
        self.window = ReportWindow()

    def validate(self) -> float:
        """Validation loss now; updates the best (and best/), metrics.jsonl and the loss curve."""
        tic = time.perf_counter()
        val_loss = self._val_loss()
        row = {"iteration": self.state.step, "epoch": self._epoch(), "val_loss": val_loss,
               "val_time": time.perf_counter() - tic, "elapsed": self.elapsed()}
        self._track_best(val_loss)
        row["best_val_loss"] = self.state.best_val_loss
        self.metrics.add(row)
        self.reporter.on_eval(row)
        if self.world.is_main:
            self._write_curve()
        self.last.val_loss = val_loss
        return val_loss

    def _val_loss(self) -> float:
        self.model.eval()
        loss_sum = ntoks = 0.0
        for b in self.batches.val:
            l, n = batch_loss(self.model, b, self.head)  # eager: a compile per validation shape costs more
            mx.eval(l, n)
            loss_sum, ntoks = loss_sum + l.item(), ntoks + n.item()
            self.beat()
        self.model.train()
        loss_sum, ntoks = self.world.sum_floats(loss_sum, ntoks)
        return loss_sum / ntoks

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
            path = ckpt.save_checkpoint(self.out, self.model, self.optimizer, self.adapter_cfg,
                                        self.state.to_dict(), self.settings.keep_last)
            self.reporter.on_save(str(path), self.state.step)
        self.last_saved = self.state.step

    def on_interrupt(self) -> Interrupted:
        """After Ctrl-C: save the last finished step unless it is saved already, and say how to resume."""
        self.reporter.finish()
        step = self.state.step
        resume = f"lorakit train --config {self.out / SETTINGS_FILE} --resume"
        if self.in_step:
            where = (f"the newest checkpoint is step {self.last_saved}" if self.last_saved
                     else "no checkpoint was saved")
            return Interrupted(f"stopped inside step {step + 1} (abandoned); {where}. Resume with: {resume}")
        if step == 0:
            return Interrupted("stopped before the first step; nothing to save. Run the same command again "
                               "to start over (with --overwrite)")
        if self.last_saved != step:
            self.save()
        return Interrupted(f"saved checkpoint at step {step}. Resume with: {resume}")

    def _finish(self) -> TrainResult:
        """The final adapter, loss curve and report.json, and the summary table."""
        if self.world.is_main:
            save_adapter(self.model, self.out, self.adapter_cfg)
            self.reporter.on_save(str(self.out / ADAPTER_FILE), self.state.step)
            self._write_curve()
        result = self.result()
        if self.world.is_main:
            write_json(self.out / REPORT, asdict(result))
        self.reporter.table("training summary", result.summary_rows())
        return result

    def result(self) -> TrainResult:
        st, out, wall = self.state, self.out, self.elapsed()
        best_dir = out / ckpt.BEST
        return TrainResult(
            adapter_path=str(out), adapter_file=str(out / ADAPTER_FILE),
            best_path=str(best_dir) if best_dir.exists() else None,
            steps=st.step, epochs=round(st.step / self.batches.steps_per_epoch, 4),
            best_step=st.best_step, best_val_loss=st.best_val_loss, initial_val_loss=st.initial_val_loss,
            final_val_loss=self.last.val_loss, final_train_loss=self.last.train_loss,
            trained_tokens=st.trained_tokens, tokens_per_second=round(st.trained_tokens / max(wall, 1e-9), 2),
            peak_memory_gb=round(mx.get_peak_memory() / 1e9, 4), wall_time_s=round(wall, 3),
            stopped_early=self.stopped_early,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            metrics_file=str(out / METRICS), loss_curve=str(out / CURVE), report_file=str(out / REPORT),
            world_size=self.world.size, **asdict(self.sizes))

    def elapsed(self) -> float:
        return self.prior_elapsed + time.perf_counter() - self.wall_start

    def _epoch(self) -> float:
        return self.state.epoch_progress(len(self.batches.plan))

    def _show_progress(self) -> None:
        self.reporter.advance(1, epoch=self._epoch(), loss=self.last.train_loss, val_loss=self.last.val_loss,
                              lr=self.optimizer.learning_rate.item(), tok_s=self.last.tokens_per_second,
                              mem_gb=round(mx.get_peak_memory() / 1e9, 3))

    def _write_curve(self) -> None:
        write_loss_curve(self.out / CURVE, self.metrics.train, self.metrics.val, self.state.best_step,
                         f"{self.model_name}")
