"""mlx-lm's own trainer (`mlx_lm.tuner.trainer.train`) on the benchmark model and data, as a user runs it.

The data goes through mlx-lm's `CacheDataset` like `mlx_lm.lora` does, so its length sort behaves as it
does for users (a no-op: `itemlen` counts the record's keys). Batches come from mlx-lm's own
`iterate_batches`; the wrapper only records each batch's (offset, length) pairs to count trained tokens.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from bench_data import Example


class _Records:
    """Stands in for mlx-lm's ChatDataset: raw records, `process` returns (tokens, offset)."""

    def __init__(self, examples: list[Example], mask_prompt: bool):
        self._items = [{"tokens": e.tokens, "offset": e.prompt_len if mask_prompt else 0} for e in examples]

    def process(self, item: dict) -> tuple[list[int], int]:
        return item["tokens"], item["offset"]

    def __getitem__(self, idx: int) -> dict:
        return self._items[idx]

    def __len__(self) -> int:
        return len(self._items)


def train(model: Any, examples: list[Example], spec: dict) -> dict:
    """Run warmup + steps iterations; return per-step wall times and trained (loss-bearing) tokens."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": spec["rank"], "scale": spec["scale"], "dropout": 0.0})
    dataset = CacheDataset(_Records(examples, spec["mask_prompt"]))
    batch_tokens: list[int] = []

    def recording_batches(**kwargs):
        for batch, lengths in trainer.iterate_batches(**kwargs):
            # mlx-lm's mask also trains the first padding position of each row; count only real targets
            offsets, lens = lengths[:, 0].tolist(), lengths[:, 1].tolist()
            batch_tokens.append(sum(n - max(o, 1) for o, n in zip(offsets, lens)))
            yield batch, lengths

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            times.append(time.perf_counter())
            losses.append(info["train_loss"])

    iters = spec["warmup"] + spec["steps"]
    args = trainer.TrainingArgs(batch_size=spec["batch_size"], iters=iters, steps_per_report=1,
                                steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=spec["max_len"],
                                grad_checkpoint=spec.get("grad_checkpoint", False),
                                adapter_file=spec["scratch"] + "/mlxlm_adapters.safetensors")
    optimizer = optim.Adam(learning_rate=spec["lr"])
    mx.reset_peak_memory()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm's UI prints to stdout; ours is the JSON result
        trainer.train(model, optimizer, dataset, None, args=args, iterate_batches=recording_batches,
                      training_callback=Clock())
    step_times = [b - a for a, b in zip([start] + times[:-1], times)]
    return {"step_times": step_times, "step_tokens": batch_tokens[:iters], "losses": losses,
            "peak_memory": mx.get_peak_memory()}
