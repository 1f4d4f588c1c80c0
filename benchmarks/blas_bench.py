"""MLX on Linux CPU with and without OpenBLAS, side by side.

Runs the same two measurements in two subprocesses, one with lorakit's OpenBLAS preload and one with
LORAKIT_NO_OPENBLAS=1 (MLX's bundled reference BLAS):
- a 1024 x 1024 x 1024 float32 matmul;
- one LoRA training step (mlx-lm LoRA layers, forward + backward + Adam) on a randomly initialised
  SmolLM2-135M-shaped llama in float32, batch 4 x 256 tokens.
Prints a table and the speed-up ratios on stderr, and one JSON object on stdout.

    python benchmarks/blas_bench.py [--steps 3] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import lorakit.engine  # noqa: F401  (loads OpenBLAS before mlx, unless LORAKIT_NO_OPENBLAS is set)
from lorakit.blas import blas_in_use

SMOLLM2_135M = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "vocab_size": 49152,
    "rope_theta": 100000.0, "tie_word_embeddings": True,
}


def measure(steps: int, batch: int, seq: int, lora_rank: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import linear_to_lora_layers

    a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
    mx.eval(a @ b)  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    matmul_s = sorted(times)[len(times) // 2]

    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(SMOLLM2_135M))
    model.freeze()
    linear_to_lora_layers(model, SMOLLM2_135M["num_hidden_layers"],
                          {"rank": lora_rank, "scale": 20.0, "dropout": 0.0,
                           "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]})
    optimizer = optim.Adam(learning_rate=1e-4)
    tokens = mx.random.randint(0, SMOLLM2_135M["vocab_size"], (batch, seq + 1))

    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:])
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        step_times.append(time.perf_counter() - start)
    # the first step also builds the optimizer state; use the later ones when there are any
    timed = step_times[1:] or step_times
    step_s = sum(timed) / len(timed)
    return {"blas": blas_in_use(), "matmul_1024_s": matmul_s, "matmul_gflops": 2 * 1024**3 / matmul_s / 1e9,
            "lora_step_s": step_s, "lora_tokens_per_s": batch * seq / step_s, "steps": steps}


def run_side(no_openblas: bool, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("LORAKIT_NO_OPENBLAS", None)
    if no_openblas:
        env["LORAKIT_NO_OPENBLAS"] = "1"
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--lora-rank", str(args.lora_rank)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="LoRA steps per side (the first is not timed if >1)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.steps, args.batch, args.seq, args.lora_rank)))
        return

    print(f"measuring with OpenBLAS, then with the reference BLAS ({args.steps} LoRA steps of "
          f"{args.batch} x {args.seq} tokens each) ...", file=sys.stderr)
    fast = run_side(False, args)
    slow = run_side(True, args)
    ratios = {"matmul": slow["matmul_1024_s"] / fast["matmul_1024_s"],
              "lora_step": slow["lora_step_s"] / fast["lora_step_s"]}
    rows = [("BLAS", fast["blas"], slow["blas"]),
            ("1024^3 fp32 matmul", f"{fast['matmul_1024_s'] * 1e3:.1f} ms", f"{slow['matmul_1024_s'] * 1e3:.1f} ms"),
            ("  GFLOP/s", f"{fast['matmul_gflops']:.1f}", f"{slow['matmul_gflops']:.1f}"),
            ("LoRA step (fwd+bwd+Adam)", f"{fast['lora_step_s']:.2f} s", f"{slow['lora_step_s']:.2f} s"),
            ("  trained tokens/s", f"{fast['lora_tokens_per_s']:.0f}", f"{slow['lora_tokens_per_s']:.0f}")]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'with OpenBLAS':>36}  {'without':>36}", file=sys.stderr)
    for name, left, right in rows:
        print(f"{name:{width}}  {left:>36}  {right:>36}", file=sys.stderr)
    print(f"speed-up with OpenBLAS: matmul {ratios['matmul']:.1f}x, LoRA step {ratios['lora_step']:.1f}x",
          file=sys.stderr)
    print(json.dumps({"with_openblas": fast, "without_openblas": slow, "speedup": ratios,
                      "shape": {"model": "SmolLM2-135M (random init, float32)", "batch": args.batch,
                                "seq": args.seq, "lora_rank": args.lora_rank, "lora_layers": "all linear, 30 layers"},
                      "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
