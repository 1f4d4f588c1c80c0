"""Attention forward + backward: MLX's fused kernel vs plain ops, by sequence length and mask.

Why lorakit rounds long batches to multiples of 128: on MLX's CUDA backend the fused attention (cuDNN) has a
backward pass only for lengths that are multiples of 128; for other lengths the gradient falls back to plain
ops that materialise B x H x T x T scores. This prints, per (length, mask), the time and peak memory of one
forward + backward through `mx.fast.scaled_dot_product_attention` and through plain ops, and how far the two
disagree (output and gradients), as a table on stderr and JSON on stdout.

    python benchmarks/attention_bench.py                       # Llama-3.2-1B attention shape, bf16, batch 4
    python benchmarks/attention_bench.py --lengths 2047,2048 --batch 8
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx
import numpy as np
from timing import time_and_peak


def plain_attention(q, k, v, scale, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    scores = mx.where(mask, scores.astype(mx.float32), -mx.inf)
    return mx.softmax(scores, axis=-1).astype(q.dtype) @ v


def packed_mask(batch: int, length: int, rng: np.random.Generator) -> mx.array:
    """Block-diagonal causal mask of rows holding several examples (as lorakit's --pack builds it)."""
    segments = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=5, replace=False))
        segments[r] = np.searchsorted(cuts, np.arange(length), side="right")
    seg = mx.array(segments)
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    return mx.expand_dims((seg[:, :, None] == seg[:, None, :]) & causal, 1)


def measure(fn, args, repeats: int) -> tuple[float, float, list[mx.array]]:
    grad = mx.value_and_grad(lambda q, k, v: (fn(q, k, v).astype(mx.float32) ** 2).sum(), argnums=(0, 1, 2))
    seconds, peak, out = time_and_peak(lambda: grad(*args), repeats)
    return seconds, peak, [out[0], *out[1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2047,2048,960,1024")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        shape_q = (args.batch, args.heads, length, args.head_dim)
        shape_kv = (args.batch, args.kv_heads, length, args.head_dim)
        q, k, v = (mx.random.normal(s, key=mx.random.key(i)).astype(dtype)
                   for i, s in enumerate((shape_q, shape_kv, shape_kv)))
        scale = args.head_dim ** -0.5
        causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
        for mask_kind, mask in (("causal", "causal"), ("packed", packed_mask(args.batch, length, rng))):
            dense = causal if mask_kind == "causal" else mask
            t_fast, m_fast, g_fast = measure(
                lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask),
                (q, k, v), args.repeats)
            t_plain, m_plain, g_plain = measure(lambda q, k, v: plain_attention(q, k, v, scale, dense),
                                                (q, k, v), args.repeats)
            diffs = [float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()) /
                     max(float(mx.abs(b.astype(mx.float32)).max()), 1e-12) for a, b in zip(g_fast, g_plain)]
            rows.append({"length": length, "mask": mask_kind, "fast_ms": round(t_fast * 1e3, 2),
                         "fast_peak_gb": round(m_fast, 3), "plain_ms": round(t_plain * 1e3, 2),
                         "plain_peak_gb": round(m_plain, 3), "max_rel_diff": [round(d, 5) for d in diffs]})
            r = rows[-1]
            print(f"T={length:5d} {mask_kind:6s} fused {r['fast_ms']:8.2f} ms {r['fast_peak_gb']:6.2f} GB | "
                  f"plain {r['plain_ms']:8.2f} ms {r['plain_peak_gb']:6.2f} GB | rel diff (value, dq, dk, dv) "
                  f"{r['max_rel_diff']}", file=sys.stderr)
    info = {"device": str(mx.default_device()), "mlx": mx.__version__, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype, "rows": rows}
    print(json.dumps(info))


if __name__ == "__main__":
    main()
