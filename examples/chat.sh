#!/usr/bin/env bash
# Fine-tune a multi-turn assistant: loss on every assistant turn (--train-on assistant), not only the last,
# never on system/user text or template headers. Then compare base vs adapter and chat with it.
#   usage: examples/chat.sh [MODEL] [ITERS] [OUT]
#   e.g.   examples/chat.sh                                               # SmolLM2-135M on CPU
#          examples/chat.sh mlx-community/Mistral-7B-Instruct-v0.3-4bit 800 runs/chat-7b   # on a Mac
set -euo pipefail
source "$(dirname "$0")/_common.sh"
MODEL=${1:-$(default_model)}
ITERS=${2:-200}
OUT=${3:-runs/chat}
mkdir -p "$OUT"
read -r -a BASE <<<"$(base_flags "$MODEL")"

lorakit prepare "$ROOT/sample_data/chat.jsonl" --out "$OUT/data" --overwrite --json >"$OUT/prepare.json"
lorakit train "${BASE[@]}" --data "$OUT/data" --adapter-path "$OUT/adapter" --overwrite --iters "$ITERS" \
  --batch-size 4 --learning-rate 2e-4 --lr-schedule cosine --warmup 0.05 --train-on assistant \
  --max-seq-length 1024 --steps-per-eval 50 --save-every 50 --val-batches -1 --json >"$OUT/train.json"
lorakit eval "${BASE[@]}" --adapter-path "$OUT/adapter" --data "$OUT/data" --split test --compare-base \
  --out "$OUT/eval" --overwrite --json >"$OUT/eval.json"

# A multi-turn conversation continued by base and adapter (JSONL in, JSONL out).
cat >"$OUT/prompts.jsonl" <<'JSONL'
{"id": "tip", "messages": [{"role": "system", "content": "You are a concise, friendly assistant."}, {"role": "user", "content": "Our dinner bill is 84 euros."}, {"role": "assistant", "content": "Got it: 84 euros. What would you like to know?"}, {"role": "user", "content": "What is a 15% tip, and the total?"}]}
JSONL
lorakit generate "${BASE[@]}" --adapter-path "$OUT/adapter" --compare-base --input "$OUT/prompts.jsonl" \
  --max-tokens 80 --output "$OUT/answers.jsonl" --overwrite --json >/dev/null

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ev = json.load(open(out + "/eval.json"))
b, a = (ev["results"][m]["loss"] for m in ("base", "adapter"))
print(f"test loss (assistant turns): base {b['loss']:.3f} -> adapter {a['loss']:.3f}")
for line in open(out + "/answers.jsonl"):
    row = json.loads(line)
    print(f"[{row.get('id')}] base:    {row.get('base_text', '')[:200]!r}")
    print(f"[{row.get('id')}] adapter: {row['text'][:200]!r}")
PY
