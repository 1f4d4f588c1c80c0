#!/usr/bin/env bash
# Packing / gradient-checkpointing settings vs mlx-lm (Llama-3.2-1B shape), one call on the CUDA machine.
# Usage (repo root, after `source .gpu/b/setup.sh`): bash benchmarks/gpu_pack_suite.sh [model] [steps] [seconds]
# mlx-lm always runs at batch 8; lorakit variants set their own batch (pack: rows of max_len tokens).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
MODEL=${1:-llama-3.2-1b}; STEPS=${2:-30}; END=$(( $(date +%s) + ${3:-530} ))
B="python benchmarks/train_bench.py --model $MODEL --batch-size 8 --max-len ${MAX_LEN:-2048} --warmup 3 --steps $STEPS"
PACK=(--trainers mlx-lm --variant pack-b4:pack=true,batch_size=4
      --variant pack-b4-gc:pack=true,batch_size=4,grad_checkpoint=true)
bench() {  # name, args...: stops at the suite's deadline
  local name=$1; shift
  local left=$(( END - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "skipped $name: out of time" | tee -a "$OUT/table.txt"; return; fi
  echo "== $name ($(date +%T), ${left}s left)" | tee -a "$OUT/table.txt" "$OUT/log.txt"
  timeout "$left" $B "$@" --out "$OUT/$name.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
}
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
bench longtail_pack --data longtail "${PACK[@]}"
bench longtail_mask_pack --data longtail --mask-prompt "${PACK[@]}"
bench uniform_gc --data uniform --trainers mlx-lm,lorakit --variant gc:grad_checkpoint=true
