"""lorakit's trainer (`lorakit.engine.train.run`) on the benchmark model and data.

The real `run` drives everything (adapters, batching, compiled step, reporting, final save). Only its two
loaders are swapped for this process: `load_model` returns the benchmark's model (random weights of a real
shape are built in memory, never written to disk) and `load_split` returns the synthetic token ids as
lorakit Examples. Tokenising and loading happen once before training in real runs too, outside the steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import bench_data
import numpy as np
from bench_models import BenchModel


def _split(examples: list[bench_data.Example], mask_prompt: bool, path: Path):
    from lorakit.engine.data.tokenized import Split, TokenizedExample

    path.write_text("".join(json.dumps({"tokens": e.tokens}) + "\n" for e in examples))
    out = []
    for e in examples:
        tokens = np.array(e.tokens, np.int32)
        mask = np.zeros(len(tokens), bool)
        mask[e.prompt_len if mask_prompt else 1:] = True
        out.append(TokenizedExample(tokens, mask))
    return Split(path=path, format="text", train_on="completions" if mask_prompt else "all", examples=out,
                 truncated=0, dropped=0)


def train(bm: BenchModel, examples: list[bench_data.Example], spec: dict) -> dict:
    import mlx.core as mx

    from lorakit.engine import train as lk_train
    from lorakit.engine.model.loading import LoadedModel
    from lorakit.engine.reporter import Reporter
    from lorakit.settings import TrainSettings

    scratch = Path(spec["scratch"])
    data_dir = scratch / "lorakit-data"
    data_dir.mkdir(exist_ok=True)
    split = _split(examples, spec["mask_prompt"], data_dir / "train.jsonl")
    loaded = LoadedModel(model=bm.model, tokenizer=None, path=bm.path or scratch, config=bm.config,
                         name=bm.name, source="dir")
    lk_train.load_model = lambda settings, reporter: loaded
    lk_train.load_split = lambda *args, **kwargs: split

    times: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []

    class Clock(Reporter):
        def on_train_report(self, info: dict) -> None:
            times.append(time.perf_counter())
            tokens.append(info["trained_tokens"])
            losses.append(info["train_loss"])

    fields = {
        "model": bm.name, "data": data_dir, "adapter_path": scratch / f"{spec['trainer'].replace(':', '-')}-adapters", "quiet": True,
        "lora_rank": spec["rank"], "lora_alpha": spec["rank"] * spec["scale"], "target_modules": ["all-linear"],
        "optimizer": "adam", "learning_rate": spec["lr"], "batch_size": spec["batch_size"],
        "max_seq_length": spec["max_len"], "iters": spec["warmup"] + spec["steps"], "seed": spec["seed"],
        "steps_per_report": 1, "steps_per_eval": 10**9, "save_every": 10**9,
        "grad_checkpoint": spec.get("grad_checkpoint", False),
    }
    fields.update(spec.get("lorakit_opts", {}))
    if fields.get("dtype") == "none":  # the model as stored (bench_models built it so)
        fields["dtype"] = None
    settings = TrainSettings(**fields)
    mx.reset_peak_memory()
    start = time.perf_counter()
    lk_train.run(settings, Clock())
    step_times = [b - a for a, b in zip([start] + times[:-1], times)]
    step_tokens = [b - a for a, b in zip([0] + tokens[:-1], tokens)]
    return {"step_times": step_times, "step_tokens": step_tokens, "losses": losses,
            "peak_memory": mx.get_peak_memory()}
