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

    python benchmarks/preference_bench.py                  # real 135M model, 4 pairs per batch
    python benchmarks/preference_bench.py --pairs 8 --repeats 10 --model path/to/model --dtype none
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


def _setup(args: argparse.Namespace, data: Path):
    """The model with its adapters, the tokenised pairs, their reference log-probs and the pass's time."""
    from lorakit.realmodel import fetch

    model_path = args.model or str(fetch(quiet=True))
    settings = TrainSettings(model=model_path, data=data, dtype=None if args.dtype == "none" else args.dtype,
                             lora_rank=8, lora_alpha=16, quiet=True)
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
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="pref-bench-"))
    try:
        shutil.copy(ROOT / "sample_data" / "preference.jsonl", data / "train.jsonl")
        loaded, head, split, reference, reference_pass = _setup(args, data)
        plan = PairPlan(split.examples, args.pairs, 2048, reference=reference, shuffle=False)
        b = len(plan) // 2  # a batch of typical length
        batch = plan.build(b).to_mx()
        model = loaded.model

        def reference_forward():
            with base_model(model):
                return sequence_logps(model, batch, head)

        rows = _interleaved({"sft": _step(model, SFT(head), batch),
                             "dpo": _step(model, DPO(head, 0.1, "sigmoid"), batch),
                             "orpo": _step(model, ORPO(head, 0.1), batch), "reference": reference_forward},
                            args.repeats)
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
