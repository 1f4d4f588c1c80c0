#!/usr/bin/env bash
# The GPU benchmark suite (Llama-3.2-1B shape, batch 8): one call on the CUDA machine, JSON + logs under $OUT.
# Usage (repo root, after `source .gpu/b/setup.sh`): bash benchmarks/gpu_suite.sh [model]
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
B="python benchmarks/train_bench.py --model ${1:-llama-3.2-1b} --batch-size 8 --max-len 2048 --warmup 3"
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
$B --steps 30 --data uniform --out "$OUT/uniform.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --steps 60 --data longtail --out "$OUT/longtail.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --steps 60 --data longtail --mask-prompt --out "$OUT/longtail_mask.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
$B --steps 60 --data longtail --trainers lorakit --lorakit-opt pack=true --out "$OUT/longtail_pack.json" \
  2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
cat "$OUT/table.txt"
