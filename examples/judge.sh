#!/usr/bin/env bash
# Fine-tune a pairwise judge ("which answer is better: A, B or tie?") and measure it:
# verdict accuracy and A/B swap consistency, base vs adapter.
#   usage: examples/judge.sh [MODEL] [ITERS] [OUT]
#   e.g.   examples/judge.sh                                   # SmolLM2-135M on CPU, ~10 min
#          examples/judge.sh mlx-community/Qwen2.5-7B-Instruct-4bit 600 runs/judge-7b   # on a Mac
set -euo pipefail
source "$(dirname "$0")/_common.sh"
MODEL=${1:-$(default_model)}
ITERS=${2:-300}
OUT=${3:-runs/judge}
mkdir -p "$OUT"
read -r -a BASE <<<"$(base_flags "$MODEL")"

lorakit prepare "$ROOT/sample_data/judge.jsonl" --out "$OUT/data" --stratify-by verdict --overwrite --json \
  >"$OUT/prepare.json"
lorakit train "${BASE[@]}" --data "$OUT/data" --adapter-path "$OUT/adapter" --overwrite --iters "$ITERS" \
  --batch-size 4 --learning-rate 2e-4 --lr-schedule cosine --warmup 0.05 --train-on assistant \
  --steps-per-eval 50 --save-every 50 --val-batches -1 --early-stopping-patience 3 --json >"$OUT/train.json"
lorakit eval "${BASE[@]}" --adapter-path "$OUT/adapter" --data "$OUT/data" --split test --judge --compare-base \
  --max-tokens 160 --out "$OUT/eval" --overwrite --json >"$OUT/eval.json"

python3 - "$OUT/eval.json" <<'PY'
import json, sys
ev = json.load(open(sys.argv[1]))
print(f"judge eval on {ev['examples']} test examples (each asked as given and with A/B swapped)")
print(f"{'metric':<18}{'base':>10}{'adapter':>10}")
for key in ("accuracy", "swapped_accuracy", "consistency", "agreement", "position_bias"):
    row = [ev["results"][m]["judge"].get(key) for m in ("base", "adapter")]
    print(f"{key:<18}" + "".join(f"{v:>10.3f}" if isinstance(v, (int, float)) else f"{'-':>10}" for v in row))
print(f"outputs: {ev['out']}")
PY
