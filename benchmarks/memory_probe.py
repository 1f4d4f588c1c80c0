"""Where a LoRA training step's activation memory goes: peak bytes per token per transformer block.

Builds a random-weight shape twice (with 2 and 4 blocks), adapts it as `lorakit train` does, measures one
compiled step (forward, backward, update) with lorakit's probe on a uniform batch, and reports the slope per
token and block, for variants that each remove one suspect:

    python benchmarks/memory_probe.py --model llama-3.2-1b --batch 8 --length 1024

- as-trained: what `lorakit train` keeps;
- no-attention: attention replaced by a stand-in of the same shapes (what attention itself keeps);
- mlp-checkpoint: the MLP recomputed in the backward pass (what the MLP keeps);
- no-lean: without the lean SwiGLU.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


def _measure(shape: str, blocks: int, dtype: str, batch: int, length: int, variant: str) -> int:
    import bench_models
    import mlx.core as mx
    import numpy as np

    from lorakit.engine.data.batching import BatchPlan
    from lorakit.engine.data.tokenized import TokenizedExample
    from lorakit.engine.model.adapters import apply_adapters
    from lorakit.engine.model.losses import loss_head
    from lorakit.engine.training.lean import use_lean_swiglu
    from lorakit.engine.training.probe import measure
    from lorakit.engine.training.speedups import use_mixed_precision_lora
    from lorakit.settings import TrainSettings

    bench_models.SHAPES[shape] = {**bench_models.SHAPES[shape], "num_hidden_layers": blocks}
    bm = bench_models.build(shape, dtype)
    settings = TrainSettings(model=shape, data=".", target_modules=["all-linear"], lora_rank=8, autofit=False)
    apply_adapters(bm.model, settings)
    use_mixed_precision_lora(bm.model)
    if variant != "no-lean":
        use_lean_swiglu(bm.model, bm.config)
    module = __import__(f"mlx_lm.models.{bm.config['model_type']}", fromlist=["x"])
    attention = module.scaled_dot_product_attention
    if variant == "no-attention":
        module.scaled_dot_product_attention = lambda q, k, v, cache, scale, mask, **kw: q * scale
    if variant == "mlp-checkpoint":
        for layer in bm.model.layers:
            mlp = layer.mlp
            layer.mlp = _Checkpointed(mlp)
    head = loss_head(bm.model)
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(rng.integers(0, 1000, length + 1).tolist(), [True] * (length + 1))
                for _ in range(batch)]
    plan = BatchPlan(examples, batch, length, seed=0)
    try:
        result = measure(bm.model, head, settings, plan, 1, timed=False)
    finally:
        module.scaled_dot_product_attention = attention
    del bm
    mx.clear_cache()
    return result.peak_bytes


class _Checkpointed:
    def __init__(self, mlp):
        import mlx.core as mx

        self.mlp = mlp
        self.call = mx.checkpoint(lambda params, x: (mlp.update(params), mlp(x))[1])

    def __call__(self, x):
        return self.call(self.mlp.trainable_parameters(), x)


@app.command()
def main(
    model: Annotated[str, typer.Option(help="A shape of benchmarks/bench_models.py.")] = "llama-3.2-1b",
    dtype: Annotated[str, typer.Option(help="Weights' dtype.")] = "bfloat16",
    batch: Annotated[int, typer.Option(help="Rows.")] = 8,
    length: Annotated[int, typer.Option(help="Tokens per row.")] = 1024,
    variants: Annotated[str, typer.Option(help="Comma list.")] = "as-trained,no-attention,mlp-checkpoint,no-lean",
) -> None:
    rows = []
    for variant in variants.split(","):
        small, large = (_measure(model, n, dtype, batch, length, variant) for n in (2, 4))
        per = (large - small) / 2 / (batch * length)
        rows.append({"variant": variant, "peak_2_blocks_gb": round(small / 1e9, 3),
                     "peak_4_blocks_gb": round(large / 1e9, 3), "bytes_per_token_per_block": round(per)})
        typer.echo(f"{variant:16s} {per / 1024:8.1f} KB per token per block  (peaks {small / 1e9:.2f} / "
                   f"{large / 1e9:.2f} GB)", err=True)
    print(json.dumps({"model": model, "dtype": dtype, "batch": batch, "length": length, "rows": rows}))


if __name__ == "__main__":
    app()
