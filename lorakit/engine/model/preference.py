"""Preference losses on batches of (chosen, rejected) rows: DPO (sigmoid, IPO, hinge) and ORPO.

A preference batch (lorakit.engine.data.batching.PairPlan) numbers its sequences chosen, rejected, chosen, ...
(two rows per pair, or packed rows); its weights mark the reply tokens. `sequence_logps` sums each sequence's
reply-token log-probabilities (what TRL and mlx-lm-lora call logps). With pi the policy's and ref the reference model's (the base, adapter off) logps:

  DPO sigmoid  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))          (Rafailov et al. 2023)
  DPO hinge    relu(1 - beta * ((pi_c - ref_c) - (pi_r - ref_r)))              (SLiC)
  IPO          ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2, on per-token mean logps (Azar et al., as TRL)
  ORPO         -mean_c - beta * log sigmoid(log odds(mean_c) - log odds(mean_r)), mean_* the per-token mean
               logps and odds(p) = p / (1 - p): the chosen reply's NLL plus the odds-ratio term (Hong et al.
               2024; TRL averages the NLL over all chosen tokens of a batch, here over each pair's)

Rewards are beta * (pi - ref) for DPO/IPO/hinge and beta * mean logp for ORPO (as TRL reports them); a pair is
"correct" when the chosen reward is the larger.

Every loss returns (sum over pairs, number of pairs, stats): the same contract as the token loss (sum and count),
so gradient accumulation and data parallelism add up exactly; `stats` sums STATS over the pairs.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx import nn

from lorakit.engine.model.losses import token_losses

STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")
DPO_VARIANTS = ("sigmoid", "ipo", "hinge")


def sequence_logps(model: nn.Module, batch: dict[str, Any], head: str | None) -> tuple[mx.array, mx.array]:
    """Each sequence's summed reply-token log-probability, and its number of reply tokens (sequences as
    `batch["sequence_of"]` numbers them: one per row, or several per packed row)."""
    ce, weights, _ = token_losses(model, batch, head)  # ce already weighted
    onehot = (batch["sequence_of"][None, :] == batch["sequences"][:, None]).astype(mx.float32)
    return onehot @ -ce, onehot @ weights


def _pairs(values: mx.array) -> tuple[mx.array, mx.array]:
    """(chosen, rejected) halves of per-row values."""
    return values[0::2], values[1::2]


def _stats(chosen_rewards: mx.array, rejected_rewards: mx.array, logps: mx.array) -> mx.array:
    chosen_logp, rejected_logp = _pairs(logps)
    margin = chosen_rewards - rejected_rewards
    parts = [(margin > 0).astype(mx.float32), margin, chosen_rewards, rejected_rewards, chosen_logp,
             rejected_logp]
    return mx.stack([p.sum() for p in parts])


def dpo_loss(logps: mx.array, counts: mx.array, reference: mx.array, beta: float,
             variant: str = "sigmoid") -> tuple[mx.array, mx.array, mx.array]:
    """DPO over per-row policy `logps` (summed), their token `counts` and the rows' `reference` logps."""
    if variant == "ipo":  # IPO compares per-token means, so long replies do not dominate
        pol, ref = logps / counts, reference / counts
    else:
        pol, ref = logps, reference
    pol_c, pol_r = _pairs(pol)
    ref_c, ref_r = _pairs(ref)
    chosen_ratio, rejected_ratio = pol_c - ref_c, pol_r - ref_r
    diff = chosen_ratio - rejected_ratio
    if variant == "ipo":
        losses = (diff - 1 / (2 * beta)) ** 2
    elif variant == "hinge":
        losses = nn.relu(1 - beta * diff)
    else:
        losses = -nn.log_sigmoid(beta * diff)
    chosen_rewards = mx.stop_gradient(beta * chosen_ratio)
    rejected_rewards = mx.stop_gradient(beta * rejected_ratio)
    return losses.sum(), mx.array(losses.shape[0], mx.float32), _stats(chosen_rewards, rejected_rewards,
                                                                       mx.stop_gradient(logps))


def orpo_loss(logps: mx.array, counts: mx.array, beta: float) -> tuple[mx.array, mx.array, mx.array]:
    """ORPO over per-row policy `logps` (summed) and their token `counts`; needs no reference."""
    mean_c, mean_r = _pairs(logps / counts)
    # log odds = log p - log(1 - p); log(-expm1(x)) keeps 1 - p accurate when p is close to 1
    log_odds = (mean_c - mean_r) - (mx.log(-mx.expm1(mean_c)) - mx.log(-mx.expm1(mean_r)))
    losses = -mean_c - beta * nn.log_sigmoid(log_odds)
    chosen_rewards, rejected_rewards = mx.stop_gradient(beta * mean_c), mx.stop_gradient(beta * mean_r)
    return losses.sum(), mx.array(losses.shape[0], mx.float32), _stats(chosen_rewards, rejected_rewards,
                                                                       mx.stop_gradient(logps))


def stat_means(stats: Any, pairs: float, prefix: str = "") -> dict[str, float]:
    """STATS averaged over `pairs`, as metrics (names with `prefix`)."""
    return {f"{prefix}{name}": float(value) / max(pairs, 1) for name, value in zip(STATS, stats, strict=True)}
