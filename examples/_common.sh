# Shared by the example scripts: repo root, default model, and the base-model flags for this platform.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_model() { python3 -m lorakit.realmodel -q; }
# On Linux CPU a float32 base is the fast path (MLX's 4-bit matmuls are slow there); on a Mac keep the
# model's own (possibly 4-bit: QLoRA) weights. Override with DTYPE=bfloat16 / DTYPE=none.
base_flags() {
  local dtype=${DTYPE:-$([ "$(uname)" = Darwin ] && echo none || echo float32)}
  if [ "$dtype" = none ]; then echo "--model $1"; else echo "--model $1 --dtype $dtype"; fi
}
