"""Preference metrics of a model on (chosen, rejected) pairs, from each reply's summed log-probability.

  accuracy         share of pairs whose chosen reply the model finds more likely (log pi(c) > log pi(r))
  mean_accuracy    the same on per-token mean log-probabilities (blind to reply length)
  margin           mean of log pi(c) - log pi(r)
  reward_accuracy  (with a reference, e.g. the base under --compare-base) DPO's implicit reward accuracy: share
                   of pairs with log pi(c) - log ref(c) > log pi(r) - log ref(r)
  reward_margin    mean of that difference (DPO's rewards with beta = 1)
"""

from __future__ import annotations

import numpy as np


def preference_metrics(logps: np.ndarray, counts: np.ndarray,
                       reference: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of per-reply `logps` and token `counts`, chosen at even and rejected at odd positions."""
    chosen, rejected = logps[0::2], logps[1::2]
    mean_c, mean_r = chosen / np.maximum(counts[0::2], 1), rejected / np.maximum(counts[1::2], 1)
    result = {"pairs": int(len(chosen)), "accuracy": float(np.mean(chosen > rejected)),
              "mean_accuracy": float(np.mean(mean_c > mean_r)), "margin": float(np.mean(chosen - rejected)),
              "chosen_logp": float(np.mean(chosen)), "rejected_logp": float(np.mean(rejected))}
    if reference is not None:
        rewards = (logps - reference)
        margin = rewards[0::2] - rewards[1::2]
        result.update(reward_accuracy=float(np.mean(margin > 0)), reward_margin=float(np.mean(margin)))
    return result
