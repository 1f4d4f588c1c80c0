"""QLoRA vs bf16: one compiled training step's peak memory and time, by layout (a diagnostic for issue 15).

Builds a random-weight shape with fewer blocks (the peak grows by a fixed amount per block), adapts it as
`lorakit train` does, and measures one step with lorakit's probe. Each row runs in its own process, so
MLX environment variables (e.g. MLX_MAX_OPS_PER_BUFFER) can differ per row:

    python benchmarks/qlora_peak.py --model llama-3.1-8b --blocks 8 --batch 4 --length 1024 \
        --row bf16: --row q4:quantize=4 --row q4-mlp:quantize=4,recompute_mlp=1 --row q4-limit:quantize=4,limit_gb=20
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


def _row(model: str, blocks: int, batch: int, length: int, opts: dict) -> dict:
    import bench_models
    import mlx.core as mx
    import numpy as np

    from lorakit.engine.data.batching import BatchPlan
    from lorakit.engine.data.tokenized import TokenizedExample
    from lorakit.engine.model import losses
    from lorakit.engine.model.adapters import apply_adapters
    from lorakit.engine.model.qlora import use_dequantized_matmuls
    from lorakit.engine.training.lean import use_lean_swiglu
    from lorakit.engine.training.probe import measure
    from lorakit.engine.training.speedups import (
        set_checkpointed,
        use_grad_checkpoint,
        use_mixed_precision_lora,
        use_mlp_recompute,
    )
    from lorakit.settings import TrainSettings

    bench_models.SHAPES[model] = {**bench_models.SHAPES[model], "num_hidden_layers": blocks}
    bm = bench_models.build(model, "bfloat16", quantize=int(opts.get("quantize", 0)) or None)
    settings = TrainSettings(model=model, data=".", target_modules=["all-linear"], lora_rank=8, autofit=False)
    apply_adapters(bm.model, settings)
    use_mixed_precision_lora(bm.model)
    if opts.get("fast", "1") == "1":
        use_dequantized_matmuls(bm.model)
    use_lean_swiglu(bm.model, bm.config)
    if "chunk" in opts:  # logits per chunk of the loss's vocabulary projection
        losses.CHUNK_ELEMENTS = int(opts["chunk"])
    if opts.get("recompute_mlp") == "1":
        use_mlp_recompute(bm.model)
    if opts.get("recompute_attn") == "1":
        set_checkpointed([block.self_attn for block in bm.model.layers], True)
    if opts.get("checkpoint") == "1":
        use_grad_checkpoint(bm.model)
    if "limit_gb" in opts:
        mx.set_memory_limit(int(float(opts["limit_gb"]) * 1e9))
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(rng.integers(0, 1000, length + 1).tolist(), [True] * (length + 1))
                for _ in range(batch)]
    plan = BatchPlan(examples, batch, length, seed=0)
    weights = mx.get_active_memory()
    result = measure(bm.model, losses.loss_head(bm.model), settings, plan, 1, timed=True)
    return {"weights_gb": round(weights / 1e9, 3), "peak_gb": round(result.peak_bytes / 1e9, 3),
            "step_s": round(result.step_s or 0, 4), "tokens_per_s": round(batch * length / (result.step_s or 1))}


def _dequantize_speed() -> list[dict]:
    """MLX's dequantize vs the element-wise unpacking lorakit uses on the CPU, on an 8B MLP weight."""
    import mlx.core as mx

    import lorakit.engine.model.qlora as qlora

    w = mx.random.normal((14336, 4096)).astype(mx.bfloat16)
    packed = mx.quantize(w, 64, 4)
    rows = []
    for name, fn in (("mlx", lambda: mx.dequantize(*packed, 64, 4)),
                     ("elementwise", mx.compile(lambda a, s, b: qlora.unpack_dequantize(a, s, b, 64, 4)))):
        args = packed if name == "elementwise" else ()
        mx.eval(fn(*args))
        mx.synchronize()
        tic = time.perf_counter()
        for _ in range(20):
            mx.eval(fn(*args))
        mx.synchronize()
        rows.append({"dequantize": name, "ms": round((time.perf_counter() - tic) / 20 * 1e3, 3)})
    return rows


@app.command()
def main(
    model: Annotated[str, typer.Option(help="A shape of benchmarks/bench_models.py.")] = "llama-3.1-8b",
    blocks: Annotated[int, typer.Option(help="Transformer blocks to build.")] = 8,
    batch: Annotated[int, typer.Option(help="Rows.")] = 4,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 1024,
    row: Annotated[list[str], typer.Option(help="label:key=value,... (quantize, fast, chunk, recompute_mlp, "
                                                "recompute_attn, checkpoint, limit_gb, env_NAME)")] = ["bf16:", "q4:quantize=4"],
    one: Annotated[str | None, typer.Option(hidden=True)] = None,
    dequantize: Annotated[bool, typer.Option(help="Also time the two de-quantizations.")] = True,
) -> None:
    if one is not None:
        print(json.dumps(_row(model, blocks, batch, length, json.loads(one))))
        return
    results = []
    for spec in row:
        label, _, rest = spec.partition(":")
        opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        env = {**os.environ, **{k[4:]: v for k, v in opts.items() if k.startswith("env_")}}
        cmd = [sys.executable, __file__, "--model", model, "--blocks", str(blocks), "--batch", str(batch),
               "--length", str(length), "--one", json.dumps(opts)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
            "error": done.stderr.strip().splitlines()[-1:]}
        results.append({"row": label, **opts, **out})
        typer.echo(f"{label:14s} {json.dumps(out)}", err=True)
    if dequantize:
        for r in _dequantize_speed():
            typer.echo(f"dequantize {r}", err=True)
            results.append(r)
    print(json.dumps({"model": model, "blocks": blocks, "batch": batch, "length": length, "rows": results}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app()
