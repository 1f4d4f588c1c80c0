"""Generation speed: lorakit generate vs mlx_lm.generate on the same model, prompt and max tokens (greedy).

Both run in this one process on the same loaded model and the same prompt tokens, alternating order on each
repeat after one warm-up each. The end-of-sequence tokens are switched off for the run so both always
generate exactly --max-tokens tokens. Two measures, the same for both sides:
- generation tok/s as mlx-lm counts it (decode only; lorakit's from its result, mlx-lm's from the stats
  `mlx_lm.generate(..., verbose=True)` prints);
- end-to-end tok/s: generated tokens / wall time of the whole call (prefill included).

    python benchmarks/generate_bench.py                      # the tiny random model, built in a temp dir
    python benchmarks/generate_bench.py --model SmolLM2-135M-Instruct.Q4_1.gguf --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lorakit.engine  # noqa: F401  (OpenBLAS before mlx)
from lorakit.engine.model import generation as gen
from lorakit.engine.model.loading import load_model
from lorakit.settings import GenerateSettings

PROMPT = "Write a long story about a robot who learns to paint."


def _lorakit(loaded, tokens: list[int], sampling, max_tokens: int) -> tuple[float, float, str]:
    sink = io.StringIO()  # stands in for stdout: the streaming path is part of what is measured
    tic = time.perf_counter()
    out = gen.generate_one(loaded.model, loaded.tokenizer, tokens, sampling, max_tokens, on_text=sink.write)
    wall = time.perf_counter() - tic
    assert out.generation_tokens == max_tokens, out
    return out.generation_tps, max_tokens / wall, out.text


def _mlx_lm(loaded, tokens: list[int], max_tokens: int) -> tuple[float, float, str]:
    from mlx_lm import generate

    printed = io.StringIO()
    tic = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        text = generate(loaded.model, loaded.tokenizer, tokens, max_tokens=max_tokens, verbose=True)
    wall = time.perf_counter() - tic
    stats = re.search(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", printed.getvalue())
    assert stats and int(stats.group(1)) == max_tokens, printed.getvalue()[-300:]
    return float(stats.group(2)), max_tokens / wall, text


def bench(model: str, dtype: str | None, prompt: str, max_tokens: int, repeats: int) -> dict:
    settings = GenerateSettings(model=model, dtype=dtype, max_tokens=max_tokens)
    loaded = load_model(settings)
    tokens = gen.build_prompt(loaded.tokenizer, prompt)
    sampling = gen.make_sampling(settings)  # greedy: temp 0
    loaded.tokenizer.eos_token_ids = []  # generate exactly max_tokens on both sides

    runs = {"lorakit": lambda: _lorakit(loaded, tokens, sampling, max_tokens),
            "mlx_lm": lambda: _mlx_lm(loaded, tokens, max_tokens)}
    texts = {name: fn()[2] for name, fn in runs.items()}  # warm-up
    if texts["lorakit"] != texts["mlx_lm"]:
        raise SystemExit("lorakit and mlx_lm.generate disagree on the greedy text; the comparison is void")
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            samples[name].append(runs[name]()[:2])

    result: dict = {"model": model, "dtype": dtype, "prompt_tokens": len(tokens), "max_tokens": max_tokens,
                    "repeats": repeats}
    for name, rows in samples.items():
        result[name] = {"generation_tps_median": statistics.median(r[0] for r in rows),
                        "end_to_end_tps_median": statistics.median(r[1] for r in rows),
                        "generation_tps": [round(r[0], 2) for r in rows]}
    for key in ("generation_tps_median", "end_to_end_tps_median"):
        result[f"ratio_{key.removesuffix('_median')}"] = result["lorakit"][key] / result["mlx_lm"][key]
    # Each repeat ran both back to back: its ratio is the least disturbed by load that drifts over the run.
    result["ratio_generation_tps_paired_median"] = statistics.median(
        a[0] / b[0] for a, b in zip(samples["lorakit"], samples["mlx_lm"], strict=True))
    return result


def _table(result: dict) -> str:
    lines = [(f"model {result['model']} (dtype {result['dtype']}), prompt {result['prompt_tokens']} tokens, "
              f"{result['max_tokens']} generated, median of {result['repeats']}"),
             f"{'':10} {'generation tok/s':>17} {'end-to-end tok/s':>17}"]
    for name in ("lorakit", "mlx_lm"):
        r = result[name]
        lines.append(f"{name:10} {r['generation_tps_median']:17.1f} {r['end_to_end_tps_median']:17.1f}")
    lines.append(f"{'ratio':10} {result['ratio_generation_tps']:17.3f} {result['ratio_end_to_end_tps']:17.3f}"
                 "   (lorakit / mlx_lm)")
    lines.append(f"{'paired':10} {result['ratio_generation_tps_paired_median']:17.3f}"
                 "   (median of per-repeat generation ratios)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model dir, hub id or .gguf (default: a tiny random model)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from lorakit.testing import tiny_model_dir

            model = str(tiny_model_dir(Path(tmp) / "tiny", tie_word_embeddings=False))
        result = bench(model, args.dtype, args.prompt, args.max_tokens, args.repeats)
    if not args.json:
        print(_table(result))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
