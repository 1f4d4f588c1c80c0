"""Optional: llama.cpp itself (`llama-completion`, Debian's `llama.cpp` package) runs lorakit's GGUF exports of the
real SmolLM2-135M and generates the same greedy text as lorakit: the fused f16 GGUF, and the base with the
adapter-only GGUF given as `--lora`. Skipped, with the reason, where llama.cpp is not installed."""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import pytest

from lorakit.engine import fuse
from lorakit.engine.model.adapters import load_adapter
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter
from lorakit.settings import FuseSettings
from lorakit.testing import random_adapter_dir

pytestmark = pytest.mark.real_model
PROMPT = "The capital of France is"
TOKENS = 12


def llama_completion() -> str:
    binary = shutil.which("llama-completion") or shutil.which("llama-cli")
    if binary is None:
        pytest.skip("llama.cpp is not installed (no llama-completion on PATH): `apt-get install llama.cpp` needs "
                    "Debian sid's package; this machine's Debian release has none")
    return binary


def llama_cpp_text(binary: str, model, *extra) -> str:
    result = subprocess.run([binary, "-m", str(model), "-p", PROMPT, "-n", str(TOKENS), "--temp", "0", "--seed", "0",
                             "--no-display-prompt", *map(str, extra)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def lorakit_text(loaded) -> str:
    from mlx_lm.generate import generate_step

    ids = loaded.tokenizer.encode(PROMPT)
    tokens = [int(t) for t, _ in generate_step(mx.array(ids), loaded.model, max_tokens=TOKENS)]
    return loaded.tokenizer.decode(tokens).strip()


def test_llama_cpp_generates_what_lorakit_generates(real_model_gguf, tmp_path):
    binary = llama_completion()
    adapter = random_adapter_dir(real_model_gguf, tmp_path / "adapter", seed=0, b_scale=0.02)
    fused, lora = tmp_path / "gguf" / "fused.gguf", tmp_path / "gguf" / "adapter.gguf"
    fuse.run(FuseSettings(model=str(real_model_gguf), adapter_path=adapter, out=tmp_path / "fused", dtype="float32",
                          export_gguf=fused, gguf_adapter=lora), RecordingReporter())

    ours = lorakit_text(load_model(FuseSettings(model=str(fused))))
    assert llama_cpp_text(binary, fused) == ours

    with_adapter = load_model(FuseSettings(model=str(real_model_gguf)))
    load_adapter(with_adapter, adapter)
    assert llama_cpp_text(binary, real_model_gguf, "--lora", lora) == lorakit_text(with_adapter)
