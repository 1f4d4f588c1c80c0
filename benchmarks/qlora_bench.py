"""The frozen linear layers of a QLoRA step, forward + input gradient: float weights vs MLX's quantized matmul
vs lorakit's de-quantize-then-matmul fast path (`lorakit/engine/model/qlora.py`).

One transformer block's linear layers of a model shape (q, k, v, o, gate, up, down), input batch x tokens x
hidden, loss = sum of squares of the outputs, gradient with respect to the input only (the frozen base gets
no weight gradient in LoRA). Prints a table on stderr and JSON on stdout.

    python benchmarks/qlora_bench.py                        # Llama-3.1-8B block shape, bf16 on GPU (fp32 on CPU)
    python benchmarks/qlora_bench.py --shape smollm2-135m --tokens 512 --batch 2 --bits 4 --group-size 32
"""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.blas import preload

preload()  # OpenBLAS before mlx is first imported on Linux CPU: keep this call above the mlx imports

import mlx.core as mx  # noqa: E402
from mlx import nn  # noqa: E402
from timing import time_and_peak  # noqa: E402

from lorakit.engine.model.qlora import use_dequantized_matmuls  # noqa: E402

SHAPES = {  # hidden, intermediate, query heads x head_dim, kv heads x head_dim
    "llama-3.1-8b": (4096, 14336, 4096, 1024),
    "llama-3.2-1b": (2048, 8192, 2048, 512),
    "smollm2-135m": (576, 1536, 576, 192),
}


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, q: int, kv: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(hidden, q, False), nn.Linear(hidden, kv, False), nn.Linear(hidden, kv, False)
        self.o = nn.Linear(q, hidden, False)
        self.gate, self.up = nn.Linear(hidden, inter, False), nn.Linear(hidden, inter, False)
        self.down = nn.Linear(inter, hidden, False)

    def __call__(self, x: mx.array) -> mx.array:
        h = x + self.o(self.q(x) + mx.repeat(self.k(x) + self.v(x), self.q.weight.shape[0] // self.k.weight.shape[0],
                                              axis=-1))
        return h + self.down(nn.silu(self.gate(h)) * self.up(h))


def measure(block: Block, x: mx.array, repeats: int) -> tuple[float, float]:
    step = mx.compile(mx.grad(lambda x: (block(x).astype(mx.float32) ** 2).sum()))
    seconds, peak, _ = time_and_peak(lambda: step(x), repeats)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default=None, help="bfloat16/float16/float32 (default: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args()
    gpu = mx.default_device() != mx.cpu
    dtype = getattr(mx, args.dtype or ("bfloat16" if gpu else "float32"))
    mx.random.seed(0)
    block = Block(*SHAPES[args.shape])
    block.set_dtype(dtype)
    x = mx.random.normal((args.batch, args.tokens, SHAPES[args.shape][0])).astype(dtype)
    rows = {}
    rows["float"] = measure(block, x, args.repeats)
    reference = mx.compile(mx.grad(lambda x: (block(x).astype(mx.float32) ** 2).sum()))(x)
    nn.quantize(block, group_size=args.group_size, bits=args.bits)
    quantized_grad = mx.grad(lambda x: (block(x).astype(mx.float32) ** 2).sum())(x)
    rows["quantized (mlx)"] = measure(block, x, args.repeats)
    use_dequantized_matmuls(block)
    fast_grad = mx.grad(lambda x: (block(x).astype(mx.float32) ** 2).sum())(x)
    rows["de-quantized (lorakit)"] = measure(block, x, args.repeats)
    scale = mx.abs(quantized_grad).max().item()
    report = {
        "device": str(mx.default_device()), "dtype": str(dtype), "settings": vars(args),
        "results": {k: {"ms": round(t * 1e3, 2), "peak_gb": round(m, 3)} for k, (t, m) in rows.items()},
        "fast_vs_quantized_speedup": round(rows["quantized (mlx)"][0] / rows["de-quantized (lorakit)"][0], 2),
        "fast_vs_float_time": round(rows["de-quantized (lorakit)"][0] / rows["float"][0], 2),
        "max_grad_diff_fast_vs_quantized_rel": mx.abs(fast_grad - quantized_grad).max().item() / scale,
        "max_grad_diff_quantized_vs_float_rel": mx.abs(quantized_grad - reference).max().item() / scale,
    }
    for name, (t, m) in rows.items():
        print(f"{name:24s} {t * 1e3:9.2f} ms  peak {m:7.3f} GB", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
