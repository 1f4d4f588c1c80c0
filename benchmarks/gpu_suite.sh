#!/usr/bin/env bash
# The GPU benchmarks (lorakit vs mlx-lm, Llama-3.2-1B shape by default) in one call on the CUDA machine;
# JSON, tables and logs under $OUT.
# Usage (repo root, after `source .gpu/b/setup.sh`):
#   bash benchmarks/gpu_suite.sh [model] [steps] [seconds] [runs]
# runs: comma list of attention, uniform, longtail, longtail_mask, longtail_pack, longtail_mask_pack,
#       qlora_block, 8b_bf16, 8b_q4, 8b_q4_budget, 8b_bf16_budget, uniform_budget, queue_peak, uniform_lean,
#       8b_q4_partial, queue_depth, uniform_swiglu, 8b_bf16_lorakit, 8b_q4_repeat,
#       8b_q4_queue, uniform_queue, loss_chunks
#       (the QLoRA, --max-memory and lean-step runs of issue 15; 8b_* and queue_peak use the Llama-3.1-8B shape),
#       longtail_auto, longtail_mask_auto, uniform_auto (issue 16: lorakit with no layout flags, its --plan beside the run)
# (default: all, in that order; a run that would start past [seconds], default 530, is skipped).
# mlx-lm always runs at batch 8; lorakit variants set their own batch (pack: rows of max_len tokens).
set -u
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
MODEL=${1:-llama-3.2-1b}; STEPS=${2:-25}; END=$(( $(date +%s) + ${3:-530} ))
RUNS=${4:-attention,uniform,longtail,longtail_mask,longtail_pack,longtail_mask_pack}
B="python benchmarks/train_bench.py --model $MODEL --batch-size 8 --max-len ${MAX_LEN:-2048} --warmup 3 --steps $STEPS"
# the 8B-shape runs of issue 15: batch 4 x ~1000-token examples (max length 1024), 20 timed steps
B8="python benchmarks/train_bench.py --model llama-3.1-8b --data uniform --batch-size 4 --max-len 1024 --warmup 3 --steps ${STEPS8:-20}"
PACK=(--trainers mlx-lm --variant pack-b3:pack=true,batch_size=3 --variant pack-b4:pack=true,batch_size=4
      --variant pack-b4-gc:pack=true,batch_size=4,grad_checkpoint=true)
bench() {  # name, args...: stops at the suite's deadline
  local name=$1; shift
  local left=$(( END - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "skipped $name: out of time" | tee -a "$OUT/table.txt"; return; fi
  echo "== $name ($(date +%T), ${left}s left)" | tee -a "$OUT/table.txt" "$OUT/log.txt"
  timeout "$left" "$@" --out "$OUT/$name.json" 2>>"$OUT/log.txt" | tee -a "$OUT/table.txt"
}
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" 2>&1 | tee -a "$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv 2>&1 | tee -a "$OUT/log.txt"
for run in ${RUNS//,/ }; do
  case $run in
    attention) echo "== attention" | tee -a "$OUT/table.txt"
               python benchmarks/attention_bench.py 2>>"$OUT/table.txt" >"$OUT/attention.json" ;;
    uniform) bench uniform $B --data uniform --trainers mlx-lm,lorakit --variant gc:grad_checkpoint=true ;;
    longtail) bench longtail $B --data longtail --trainers mlx-lm,lorakit ;;
    longtail_mask) bench longtail_mask $B --data longtail --mask-prompt --trainers mlx-lm,lorakit ;;
    longtail_pack) bench longtail_pack $B --data longtail "${PACK[@]}" ;;
    longtail_mask_pack) bench longtail_mask_pack $B --data longtail --mask-prompt "${PACK[@]}" ;;
    qlora_block) echo "== qlora_block" | tee -a "$OUT/table.txt"
                 python benchmarks/qlora_bench.py 2>>"$OUT/table.txt" >"$OUT/qlora_block.json" ;;
    8b_bf16) bench 8b_bf16 $B8 --trainers mlx-lm,lorakit ;;
    8b_q4) bench 8b_q4 $B8 --quantize 4 --trainers mlx-lm,lorakit --variant no-fast-qlora:fast_qlora=false ;;
    8b_q4_budget) bench 8b_q4_budget $B8 --quantize 4 --trainers mlx-lm,lorakit --variant mem26:max_memory=26 \
                    --variant mem40:max_memory=40 ;;
    8b_bf16_budget) bench 8b_bf16_budget $B8 --trainers lorakit --lorakit-opt max_memory=26 ;;
    uniform_budget) bench uniform_budget $B --data uniform --trainers mlx-lm,lorakit --variant mem24:max_memory=24 ;;
    queue_peak) echo "== queue_peak" | tee -a "$OUT/table.txt"
                python benchmarks/qlora_peak.py --model llama-3.1-8b --blocks 8 --batch 4 --length 1024 \
                  --row bf16: --row q4:quantize=4 --row q4-ops2:quantize=4,env_MLX_MAX_OPS_PER_BUFFER=2 \
                  --row q4-mlp:quantize=4,recompute_mlp=1 2>>"$OUT/table.txt" >"$OUT/queue_peak.json" ;;
    longtail_auto) bench longtail_auto $B --data longtail --plan --trainers mlx-lm,lorakit --variant fixed:autofit=false ;;
    longtail_mask_auto) bench longtail_mask_auto $B --data longtail --mask-prompt --plan --trainers mlx-lm,lorakit ;;
    uniform_auto) bench uniform_auto $B --data uniform --plan --trainers mlx-lm,lorakit --variant fixed:autofit=false ;;
    8b_q4_partial) bench 8b_q4_partial $B8 --quantize 4 --trainers mlx-lm,lorakit --variant mem26:max_memory=26 \
                     --variant mem24:max_memory=24 --variant swiglu:recompute_swiglu=true ;;
    queue_depth) echo "== queue_depth" | tee -a "$OUT/table.txt"
                 python benchmarks/qlora_peak.py --model llama-3.1-8b --blocks 8 --batch 4 --length 1024 --no-dequantize \
                   --row q4:quantize=4 --row q4-ops8:quantize=4,env_MLX_MAX_OPS_PER_BUFFER=8 --row bf16: \
                   --row bf16-ops8:env_MLX_MAX_OPS_PER_BUFFER=8 2>>"$OUT/table.txt" >"$OUT/queue_depth.json" ;;
    uniform_swiglu) bench uniform_swiglu $B --data uniform --trainers mlx-lm,lorakit \
                      --variant swiglu:recompute_swiglu=true --variant mem24:max_memory=24 --variant mem22:max_memory=22 ;;
    8b_bf16_lorakit) bench 8b_bf16_lorakit $B8 --trainers lorakit ;;
    8b_q4_repeat) bench 8b_q4_repeat $B8 --quantize 4 --trainers mlx-lm \
                    --variant mem26:max_memory=26 --variant mem27:max_memory=27 ;;
    8b_q4_queue) bench 8b_q4_queue $B8 --quantize 4 --trainers lorakit --lorakit-opt max_memory=26 \
                   --lorakit-opt env_MLX_MAX_OPS_PER_BUFFER=20 ;;
    uniform_queue) bench uniform_queue $B --data uniform --trainers mlx-lm --variant mem24:max_memory=24 \
                     --variant mem24-ops20:max_memory=24,env_MLX_MAX_OPS_PER_BUFFER=20 ;;
    loss_chunks) echo "== loss_chunks" | tee -a "$OUT/table.txt"
                 python benchmarks/qlora_peak.py --model llama-3.1-8b --blocks 8 --batch 4 --length 1024 --no-dequantize \
                   --row q4-ops8:quantize=4,env_MLX_MAX_OPS_PER_BUFFER=8 \
                   --row q4-ops8-c25:quantize=4,env_MLX_MAX_OPS_PER_BUFFER=8,chunk=33554432 \
                   --row q4-ops8-c24:quantize=4,env_MLX_MAX_OPS_PER_BUFFER=8,chunk=16777216 \
                   2>>"$OUT/table.txt" >"$OUT/loss_chunks.json" ;;
    uniform_lean) bench uniform_lean $B --data uniform --trainers mlx-lm,lorakit --variant no-lean:lean_activations=false ;;
    *) echo "unknown run: $run" >&2; exit 2 ;;
  esac
done
cat "$OUT/table.txt"
