"""What a run optimises: the token loss (SFT), DPO or ORPO (--objective).

The compiled steps and the Trainer only call `objective.loss(model, batch) -> (loss sum, count, stats)` and
`objective.metrics(stats, count)`: the count is loss tokens for SFT and pairs for DPO/ORPO, so the update
(gradient of the sum / total count) is the mean token loss or the mean pair loss alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np
from mlx import nn

from lorakit.engine.data.batching import PairPlan
from lorakit.engine.data.tokenized import Split, TokenizedExample
from lorakit.engine.model.losses import batch_loss
from lorakit.engine.model.preference import dpo_loss, orpo_loss, sequence_logps, stat_means
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.settings import TrainSettings


@dataclass(frozen=True)
class SFT:
    """Cross-entropy on the loss-bearing tokens."""

    head: str | None
    needs_reference: ClassVar[bool] = False

    def loss(self, model: nn.Module, batch: dict) -> tuple[mx.array, mx.array, mx.array]:
        loss_sum, ntoks = batch_loss(model, batch, self.head)
        return loss_sum, ntoks, mx.zeros((0,))

    def metrics(self, stats: Any, count: float, prefix: str = "") -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class DPO:
    """Direct preference optimisation against the base model's log-probabilities (`batch["reference"]`)."""

    head: str | None
    beta: float
    variant: str  # sigmoid, ipo or hinge (--dpo-loss)
    needs_reference: ClassVar[bool] = True

    def loss(self, model: nn.Module, batch: dict) -> tuple[mx.array, mx.array, mx.array]:
        logps, counts = sequence_logps(model, batch, self.head)
        return dpo_loss(logps, counts, batch["reference"], self.beta, self.variant)

    def metrics(self, stats: Any, count: float, prefix: str = "") -> dict[str, float]:
        return stat_means(stats, count, prefix)


@dataclass(frozen=True)
class ORPO:
    """Odds-ratio preference optimisation: the chosen reply's NLL plus an odds-ratio term; no reference."""

    head: str | None
    beta: float
    needs_reference: ClassVar[bool] = False

    def loss(self, model: nn.Module, batch: dict) -> tuple[mx.array, mx.array, mx.array]:
        logps, counts = sequence_logps(model, batch, self.head)
        return orpo_loss(logps, counts, self.beta)

    def metrics(self, stats: Any, count: float, prefix: str = "") -> dict[str, float]:
        return stat_means(stats, count, prefix)


Objective = SFT | DPO | ORPO


def objective_for(settings: TrainSettings, train_set: Split, valid_set: Split | None, head: str | None,
                  reporter: Reporter) -> Objective:
    """The --objective for this data: preference pairs default to DPO (with a note), other data to SFT."""
    pairs = train_set.format == "preference"
    if valid_set is not None and (valid_set.format == "preference") != pairs:
        raise UserError(f"{valid_set.path} holds {valid_set.format} records but {train_set.path} holds "
                        f"{train_set.format} ones; prepare both splits from the same kind of data")
    chosen = settings.objective
    if chosen is None:
        chosen = "dpo" if pairs else "sft"
        if pairs:
            reporter.log(f"{train_set.path} holds preference pairs: training with --objective dpo "
                         f"(beta {settings.beta:g}); pass --objective orpo or sft to choose")
    if chosen == "sft":
        if pairs:
            raise UserError(f"--objective sft: {train_set.path} holds preference pairs (chosen/rejected); use "
                            "--objective dpo or orpo, or prepare prompt/completion data for SFT")
        return SFT(head)
    if not pairs:
        raise UserError(f"--objective {chosen}: {train_set.path} holds {train_set.format} records, not "
                        "preference pairs; prepare records with prompt, chosen and rejected")
    if chosen == "orpo":
        return ORPO(head, settings.beta)
    return DPO(head, settings.beta, settings.dpo_loss)


def reference_logps(model: nn.Module, examples: list[TokenizedExample], head: str | None, batch_size: int,
                    max_seq_length: int, reporter: Reporter, name: str) -> np.ndarray:
    """Every example's summed reply log-probability under `model` as it is now (the base: called before the
    adapters are added), computed once per run; DPO's reference model without a second copy in memory."""
    plan = PairPlan(examples, batch_size, max_seq_length, shuffle=False)
    out = np.zeros(len(examples), np.float32)
    model.eval()
    reporter.start(f"reference log-probs ({name})", total=len(plan))
    for b, pairs in enumerate(plan.batches):
        logps, _ = sequence_logps(model, plan.build(b).to_mx(), head)
        out[[i for pair in pairs for i in pair]] = np.array(logps)
        reporter.advance(1)
    reporter.finish()
    model.train()
    return out
