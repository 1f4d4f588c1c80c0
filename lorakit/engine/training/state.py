"""Where a run is: TrainState (what a checkpoint's trainer_state.json holds) and the running report values."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """Step, data position and validation history: with the weights, enough to continue a run exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next batch is batch `batch_index` of epoch `epoch`
    batch_index: int = 0
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    initial_val_loss: float | None = None
    elapsed: float = 0.0  # wall seconds of the run so far, across resumes
    train_data_sha256: str = ""
    seed: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def epoch_progress(self, batches_per_epoch: int) -> float:
        """Epochs done, with the fraction of the current one (1.5: halfway through the second)."""
        return round((self.epoch * batches_per_epoch + self.batch_index) / batches_per_epoch, 4)

    def move_past(self, epoch: int, index: int, batches_per_epoch: int) -> None:
        """Set the data position to just after batch `index` of `epoch`."""
        if index + 1 < batches_per_epoch:
            self.epoch, self.batch_index = epoch, index + 1
        else:
            self.epoch, self.batch_index = epoch + 1, 0


@dataclass
class ReportWindow:
    """Totals over the steps since the last train report."""

    loss: float = 0.0  # summed loss (over tokens, or over pairs for DPO/ORPO)
    count: float = 0.0  # what the loss is summed over: the mean loss is loss / count
    tokens: int = 0  # loss-bearing tokens trained (reply tokens of both replies for pairs)
    time: float = 0.0
    steps: int = 0

    def add(self, loss: float, count: float, tokens: int, seconds: float) -> None:
        self.loss += loss
        self.count += count
        self.tokens += tokens
        self.time += seconds
        self.steps += 1


@dataclass
class LastSeen:
    """The latest reported values (progress bar and result)."""

    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float | None = None
