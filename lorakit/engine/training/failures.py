"""How a run ends before its last step: Ctrl-C or SIGTERM, out of memory, a loss that is no longer finite."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.training.layout import Layout, smaller_layout
from lorakit.engine.training.result import SETTINGS_FILE
from lorakit.errors import RunError
from lorakit.settings import TrainSettings


@dataclass
class StopRequest:
    """Set by a first Ctrl-C / SIGTERM; the training loop stops after the step it is in."""

    requested: bool = False


@contextmanager
def deferred_interrupts(stop: StopRequest):
    """Ctrl-C / SIGTERM set `stop` for the loop to check between steps; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "memory" in str(e).lower() or "bad_alloc" in str(e)


def oom_error(e: BaseException, settings: TrainSettings, step: int, lengths: list[int]) -> RunError:
    """Exit 1 for an out-of-memory step: the layout that ran out, the next smaller one autofit measures, and
    the other settings that save memory."""
    hints = []
    smaller = smaller_layout(settings, lengths)
    if smaller is not None:
        hints.append(f"{smaller.flags()} (the next smaller layout, same tokens per optimizer step)")
    hints.append(f"--max-seq-length {max(2, settings.max_seq_length // 2)}")
    if settings.num_layers < 0 or settings.num_layers > 8:
        hints.append("--num-layers 8")
    if settings.fine_tune_type == "full":
        hints.append("--fine-tune-type lora")
    if not settings.quantize:
        hints.append("--quantize 4")
    plan = "lorakit train --plan --max-memory GB (what this machine can give) shows the layout that fits"
    return RunError(f"out of memory at step {step} ({e}) with {Layout.of(settings).flags()}. "
                    f"Try: {'; '.join(hints)}. Or: {plan}. The checkpoints saved so far are kept.")


def nonfinite_error(settings: TrainSettings, step: int, what: str, *, out: Path, last_good: Path | None,
                    suspect: Path | None, staged: bool) -> RunError:
    """Exit 1 for a step that is not finite: what went wrong, what to try, and which checkpoint to resume.

    `suspect`: the checkpoint this step's weights came from when the loss or gradient on them was not
    finite (resuming it would fail the same way); `staged`: nothing of this run will be kept (--overwrite).
    """
    tips = [f"a lower --learning-rate (now {settings.learning_rate:g})", "--max-grad-norm 1.0",
            "--warmup 0.05"]
    if settings.dtype == "float16" or settings.dtype is None:
        tips.append("--dtype float32 or bfloat16 (float16 overflows easily)")
    text = (f"step {step}: {what}. Likely causes: a learning rate too high, float16 overflow, or a broken "
            f"base model. Try {', '.join(tips)}. Nothing from this step was saved")
    if suspect is not None:
        text += (f"; checkpoint {suspect} holds the weights this step started from, so resuming it would "
                 f"fail the same way: it is marked suspect ({ckpt.SUSPECT}) and --resume skips it")
    if staged:
        return RunError(text + ".")
    if last_good is None:
        return RunError(text + "; no good checkpoint is left: start over (--overwrite) with a lower "
                               "--learning-rate.")
    return RunError(text + f"; the last good checkpoint is {last_good}: resume it with `lorakit train "
                           f"--config {out / SETTINGS_FILE} --resume` and a lower --learning-rate.")
