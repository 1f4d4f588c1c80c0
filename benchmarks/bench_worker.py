"""One trainer's benchmark run in its own process: `python bench_worker.py '<spec json>'`.

Writes its measurements as JSON to spec["result"]. Started by train_bench.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import bench_data
import bench_models


def blas_loaded() -> str:
    """What lorakit's preload did (numpy's own bundled OpenBLAS is no help to mlx, so /proc maps can't tell)."""
    from lorakit.blas import blas_in_use

    return blas_in_use()


def cpu_matmul_gflops() -> float:
    """A 512^3 float32 matmul on the CPU stream: tells the reference BLAS (~5 GFLOP/s) from OpenBLAS."""
    import mlx.core as mx

    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(3):
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
    return round(3 * 2 * 512**3 / (time.perf_counter() - start) / 1e9, 1)


def flops_per_trained_token(model, config: dict, examples: list, mask_prompt: bool, rank: int) -> float:
    """Model FLOPs of one LoRA training step divided by its trained tokens (formula in benchmarks/README.md)."""
    body, head, lora_io = bench_models.linear_counts(model)
    layers, attn_dim = bench_models.attention_dims(config)
    total = 0.0
    trained = 0
    for ex in examples:
        n, k = len(ex.tokens), bench_data.loss_tokens(ex, mask_prompt)
        total += 4 * body * n  # frozen matmuls: forward + input gradients
        total += 6 * rank * lora_io * n  # LoRA branch: forward, input and weight gradients
        total += 6 * layers * attn_dim * n * n / 2  # causal attention: QK^T and AV, forward + backward
        total += 4 * head * k  # output head at loss-bearing positions
        trained += k
    return total / trained


def main() -> None:
    spec = json.loads(sys.argv[1])
    opts = spec.get("lorakit_opts", {})
    spec["lorakit_opts"] = {k: v for k, v in opts.items() if not k.startswith("env_")}
    lorakit = spec["trainer"].startswith("lorakit")
    # a lorakit variant may load the model in another dtype (e.g. a GGUF as shipped vs de-quantized)
    dtype = opts.get("dtype", spec["dtype"]) if lorakit else spec["dtype"]
    if lorakit:  # what `lorakit train` sets before its model loads
        from lorakit.engine.training.fit import shallow_queue

        # env_NAME=value: an environment variable for lorakit's run, set before MLX starts (e.g. the queue depth)
        os.environ.update({k[4:]: v for k, v in opts.items() if k.startswith("env_")})
        shallow_queue(opts.get("max_memory"))
    bm = bench_models.build(spec["model"], dtype, seed=spec["seed"], scratch=Path(spec["scratch"]),
                            quantize=spec.get("quantize"))
    blas = blas_loaded()
    count = spec["batch_size"] * (spec["warmup"] + spec["steps"])
    examples = bench_data.make(spec["data"], count, bm.config["vocab_size"], spec["max_len"], seed=spec["seed"],
                               scale=spec["length_scale"])
    result = {
        "trainer": spec["trainer"],
        "warmup": spec["warmup"],
        "blas": blas,
        "cpu_matmul_gflops": cpu_matmul_gflops(),
        "data": bench_data.summary(examples, spec["mask_prompt"]),
        "flops_per_trained_token": flops_per_trained_token(bm.model, bm.config, examples, spec["mask_prompt"],
                                                           spec["rank"]),
    }
    if spec["trainer"].startswith("mlx-lm"):
        import bench_mlxlm

        result.update(bench_mlxlm.train(bm.model, examples, spec))
    else:
        import bench_lorakit

        rebuild = lambda: bench_models.build(spec["model"], dtype, seed=spec["seed"],  # noqa: E731
                                             scratch=Path(spec["scratch"]), quantize=spec.get("quantize"))
        result.update(bench_lorakit.train(bm, examples, spec, rebuild))
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
