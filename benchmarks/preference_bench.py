"""A DPO (and ORPO) training step against an SFT step on the same pairs, side by side in one process.

The model (default: the real SmolLM2-135M-Instruct GGUF, float32 base) gets LoRA rank 8 on all linear layers,
as `lorakit train` does (lean activations on); the pairs of sample_data/preference.jsonl are tokenised as
training tokenises them, and one batch of --pairs pairs (both replies of each pair, 2 x --pairs rows) is timed
through the compiled step (forward, backward, AdamW update) with each objective:

  sft   cross-entropy on the reply tokens of all rows (what an SFT step on the same pairs costs)
  dpo   DPO (sigmoid) with the reference log-probabilities precomputed (lorakit's way: once per run)
  orpo  ORPO (no reference)

It also times the reference forward of that batch (the base with the adapter switched off), so
`dpo + reference` is what a step would cost with the reference computed at every step, and the one-time
reference pass over the whole set. Prints a table on stderr and JSON on stdout.

With --mlx-lm-lora (mlx-lm-lora importable) it also times mlx-lm-lora's DPO step on the same rows: its own
get_token_scores / compute_score / dpo_loss, compiled with the optimizer update as its train_dpo does, with its
reference model (a second copy of the base, as it loads one) forwarded inside every step.

    python benchmarks/preference_bench.py                  # real 135M model, 4 pairs per batch
    python benchmarks/preference_bench.py --pairs 8 --repeats 10 --model path/to/model --dtype none
    # mlx-lm-lora in a side venv, so the shared environment's packages stay as they are:
    python3 -m venv --system-site-packages /tmp/v && /tmp/v/bin/pip install --no-deps mlx-lm-lora
    /tmp/v/bin/python benchmarks/preference_bench.py --mlx-lm-lora
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.blas import preload

preload()  # OpenBLAS before mlx is first imported on Linux CPU: keep this call above the mlx imports

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from timing import time_and_peak  # noqa: E402

from lorakit.engine.data.batching import PairPlan  # noqa: E402
from lorakit.engine.data.tokenized import load_split  # noqa: E402
from lorakit.engine.model.adapters import apply_adapters  # noqa: E402
from lorakit.engine.model.generation import base_model  # noqa: E402
from lorakit.engine.model.loading import load_model  # noqa: E402
from lorakit.engine.model.losses import loss_head  # noqa: E402
from lorakit.engine.model.preference import sequence_logps  # noqa: E402
from lorakit.engine.reporter import Reporter  # noqa: E402
from lorakit.engine.training.lean import use_lean_swiglu  # noqa: E402
from lorakit.engine.training.objective import DPO, ORPO, SFT, reference_logps  # noqa: E402
from lorakit.engine.training.steps import compile_steps  # noqa: E402
from lorakit.settings import TrainSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _train_settings(args: argparse.Namespace, data: Path) -> TrainSettings:
    from lorakit.realmodel import fetch

    return TrainSettings(model=args.model or str(fetch(quiet=True)), data=data, lora_rank=8, lora_alpha=16,
                         dtype=None if args.dtype == "none" else args.dtype, quiet=True)


def _setup(args: argparse.Namespace, data: Path):
    """The model with its adapters, the tokenised pairs, their reference log-probs and the pass's time."""
    settings = _train_settings(args, data)
    loaded = load_model(settings, Reporter())
    head = loss_head(loaded.model)
    split = load_split(data, "train", loaded.tokenizer, "auto", 2048)
    tic = time.perf_counter()
    reference = reference_logps(loaded.model, split.examples, head, args.pairs, 2048, Reporter(), "train")
    reference_pass = time.perf_counter() - tic
    mx.random.seed(0)
    apply_adapters(loaded.model, settings)
    use_lean_swiglu(loaded.model, loaded.config)
    loaded.model.train()
    return loaded, head, split, reference, reference_pass


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, float, float]]:
    """Median and fastest seconds and peak GB of each run, timed in turns (a, b, c, a, b, c, ...): on a shared
    machine a slow spell then slows every contender alike instead of one (the fastest is the least disturbed)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks = {}
    for name, run in runs.items():  # compile and warm
        _, peaks[name], _ = time_and_peak(run, 1)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            mx.eval(run())
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), min(t), peaks[name]) for name, t in times.items()}


def _mlx_lm_lora_step(model, settings: TrainSettings, rows: Any) -> Callable[[], Any]:
    """mlx-lm-lora's DPO step (sigmoid, beta 0.1) on the same rows: chosen at even, rejected at odd rows."""
    from functools import partial

    from mlx import nn
    from mlx_lm_lora.trainer.dpo_trainer import compute_score, dpo_loss, get_token_scores

    reference = load_model(settings, Reporter()).model.freeze()  # its load_reference_model: a second copy
    tokens = np.concatenate([rows.inputs, rows.targets[:, -1:]], axis=1)
    masks = np.concatenate([np.zeros((len(tokens), 1), np.float32), rows.weights], axis=1)
    chosen, rejected = mx.array(tokens[0::2]), mx.array(tokens[1::2])
    chosen_masks, rejected_masks = mx.array(masks[0::2]), mx.array(masks[1::2])

    def loss(c, r, cm, rm):
        scores = [compute_score(get_token_scores(model, x, m), m, "sigmoid") for x, m in ((c, cm), (r, rm))]
        refs = [compute_score(mx.stop_gradient(get_token_scores(reference, x, m)), m, "sigmoid")
                for x, m in ((c, cm), (r, rm))]
        return dpo_loss(scores[0], scores[1], refs[0], refs[1], cm, rm, beta=0.1, delta=50.0, loss_type="sigmoid")

    optimizer = optim.AdamW(learning_rate=1e-6)
    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(c, r, cm, rm):
        (value, reward, toks, metrics), grad = loss_and_grad(c, r, cm, rm)
        optimizer.update(model, grad)
        return value, reward, toks, metrics

    return lambda: (step(chosen, rejected, chosen_masks, rejected_masks), state)


def _step(model, objective, batch: dict) -> Callable[[], Any]:
    optimizer = optim.AdamW(learning_rate=1e-6)  # tiny steps: the weights stay close to the start
    steps = compile_steps(model, optimizer, objective.loss, None)
    return lambda: (steps.full(batch), steps.state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or id (default: the real SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--dtype", default="float32", help="base dtype, or 'none' to keep the model's own")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mlx-lm-lora", action="store_true", help="also time mlx-lm-lora's DPO step")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    try:
        shutil.copy(ROOT / "sample_data" / "preference.jsonl", data / "train.jsonl")
        loaded, head, split, reference, reference_pass = _setup(args, data)
        plan = PairPlan(split.examples, args.pairs, 2048, reference=reference, shuffle=False)
        b = len(plan) // 2  # a batch of typical length
        rows_np = plan.build(b)
        batch = rows_np.to_mx()
        model = loaded.model

        def reference_forward():
            with base_model(model):
                return sequence_logps(model, batch, head)

        runs = {"sft": _step(model, SFT(head), batch), "dpo": _step(model, DPO(head, 0.1, "sigmoid"), batch),
                "orpo": _step(model, ORPO(head, 0.1), batch), "reference": reference_forward}
        if args.mlx_lm_lora:
            runs["mlx-lm-lora dpo"] = _mlx_lm_lora_step(model, _train_settings(args, data), rows_np)
        rows = _interleaved(runs, args.repeats)
        forward = rows.pop("reference")
    finally:
        shutil.rmtree(data, ignore_errors=True)

    sft, sft_min = rows["sft"][0], rows["sft"][1]
    result = {
        "model": loaded.name, "dtype": args.dtype, "device": str(mx.default_device()), "pairs": args.pairs,
        "rows": 2 * args.pairs, "width": int(batch["inputs"].shape[1]), "reply_tokens": int(batch["weights"].sum()),
        "steps_s": {name: round(s, 4) for name, (s, _, _) in rows.items()},
        "fastest_s": {name: round(s, 4) for name, (_, s, _) in rows.items()},
        "peak_gb": {name: round(p, 4) for name, (_, _, p) in rows.items()},
        "reference_forward_s": round(forward[0], 4), "reference_forward_fastest_s": round(forward[1], 4),
        "ratio_to_sft": {"dpo": round(rows["dpo"][0] / sft, 3), "orpo": round(rows["orpo"][0] / sft, 3),
                         "dpo_with_reference_each_step": round((rows["dpo"][0] + forward[0]) / sft, 3)},
        "fastest_ratio_to_sft": {"dpo": round(rows["dpo"][1] / sft_min, 3), "orpo": round(rows["orpo"][1] / sft_min, 3),
                                 "dpo_with_reference_each_step": round((rows["dpo"][1] + forward[1]) / sft_min, 3)},
        "reference_pass_s": round(reference_pass, 3), "pairs_in_set": len(split.examples) // 2,
    }
    if "mlx-lm-lora dpo" in rows:
        result["ratio_to_sft"]["mlx-lm-lora dpo"] = round(rows["mlx-lm-lora dpo"][0] / sft, 3)
        result["fastest_ratio_to_sft"]["mlx-lm-lora dpo"] = round(rows["mlx-lm-lora dpo"][1] / sft_min, 3)
    _print_table(rows, forward, reference_pass, result["pairs_in_set"])
    print(json.dumps(result))


def _print_table(rows: dict[str, tuple[float, float, float]], forward: tuple[float, float, float],
                 reference_pass: float, pairs: int) -> None:
    (sft, sft_min, _), out = rows["sft"], sys.stderr
    print(f"{'step':<26}{'median s':>10}{'x sft':>8}{'fastest s':>11}{'x sft':>8}{'peak GB':>10}", file=out)
    for name, (seconds, fastest, peak) in rows.items():
        print(f"{name:<26}{seconds:>10.3f}{seconds / sft:>8.2f}{fastest:>11.3f}{fastest / sft_min:>8.2f}"
              f"{peak:>10.3f}", file=out)
    median, fastest = rows["dpo"][0] + forward[0], rows["dpo"][1] + forward[1]
    print(f"{'dpo + reference forward':<26}{median:>10.3f}{median / sft:>8.2f}{fastest:>11.3f}"
          f"{fastest / sft_min:>8.2f}", file=out)
    print(f"one-time reference pass over {pairs} pairs: {reference_pass:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
