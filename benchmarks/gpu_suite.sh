#!/usr/bin/env bash
# The GPU benchmark suite: one call on the device machine, JSON reports and logs under $OUT (or ./bench-out).
# Usage: bash benchmarks/gpu_suite.sh [model] [steps]   (after `source .gpu/b/setup.sh` on the CUDA machine)
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
MODEL=${1:-llama-3.2-1b}; STEPS=${2:-30}
B="python benchmarks/train_bench.py --model $MODEL --batch-size 8 --max-len 2048 --steps $STEPS --warmup 3"
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
$B --data uniform --out "$OUT/uniform.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --data longtail --out "$OUT/longtail.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --data longtail --mask-prompt --out "$OUT/longtail_mask.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --data longtail --trainers lorakit --lorakit-opt pack=true --out "$OUT/longtail_pack.json" \
  2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --data longtail --mask-prompt --trainers lorakit --lorakit-opt pack=true --out "$OUT/longtail_mask_pack.json" \
  2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
tail -40 "$OUT/log.txt"
cat "$OUT/table.txt"
