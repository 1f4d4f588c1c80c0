"""lorakit's trainer (`lorakit.engine.train.run`) on the benchmark model and data.

The real `run` drives everything (adapters, batching, compiled step, reporting, final save). Only its two
loaders are swapped for this process: `load_model` returns the benchmark's model (random weights of a real
shape are built in memory, never written to disk) and `load_split` returns the synthetic token ids as
lorakit Examples. Tokenising and loading happen once before training in real runs too, outside the steps.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
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


def train(bm: BenchModel, examples: list[bench_data.Example], spec: dict, rebuild=None) -> dict:
    import mlx.core as mx

    from lorakit.engine import train as lk_train
    from lorakit.engine.model.loading import LoadedModel
    from lorakit.engine.reporter import Reporter
    from lorakit.settings import TrainSettings

    scratch = Path(spec["scratch"])
    data_dir = scratch / "lorakit-data"
    data_dir.mkdir(exist_ok=True)
    split = _split(examples, spec["mask_prompt"], data_dir / "train.jsonl")
    def loaded_model(model_bm: BenchModel) -> LoadedModel:
        return LoadedModel(model=model_bm.model, tokenizer=None, path=model_bm.path or scratch,
                           config=model_bm.config, name=model_bm.name, source="dir")

    lk_train.load_model = lambda settings, reporter: loaded_model(bm)
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
    }
    if spec.get("grad_checkpoint"):  # otherwise autofit decides (like a user who passes no such flag)
        fields["grad_checkpoint"] = True
    fields.update(spec.get("lorakit_opts", {}))
    if fields.get("dtype") == "none":  # the model as stored (bench_models built it so)
        fields["dtype"] = None
    settings = TrainSettings(**fields)
    plan = None
    if spec.get("plan") and spec["trainer"] == "lorakit" and rebuild:  # `lorakit train --plan`, on a copy
        planned = rebuild()
        lk_train.load_model = lambda settings, reporter: loaded_model(planned)
        plan = asdict(lk_train.run(settings.model_copy(update={"plan": True}), Reporter()))
        lk_train.load_model = lambda settings, reporter: loaded_model(bm)
        del planned
        gc.collect()
    mx.reset_peak_memory()
    start = time.perf_counter()
    lk_train.run(settings, Clock())
    step_times = [b - a for a, b in zip([start] + times[:-1], times)]
    step_tokens = [b - a for a, b in zip([0] + tokens[:-1], tokens)]
    return {"step_times": step_times, "step_tokens": step_tokens, "losses": losses,
            "peak_memory": mx.get_peak_memory(), "plan": plan, "layout": _layout(settings.adapter_path)}


def _layout(adapter_path: Path) -> str:
    import json as _json

    report = adapter_path / "report.json"
    return _json.loads(report.read_text()).get("layout", "") if report.exists() else ""
