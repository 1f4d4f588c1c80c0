"""The float fused model loads with transformers (CPU torch) and agrees with MLX: logits and greedy output."""

import json

import mlx.core as mx
import numpy as np
import pytest

from lorakit.engine import fuse
from lorakit.engine.reporter import RecordingReporter
from lorakit.settings import FuseSettings
from lorakit.testing import gguf_layout_model_dir, random_adapter_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "How do I reset my password?"]


@pytest.fixture(scope="module")
def fused_dirs(tiny_model, tiny_model_q4, tmp_path_factory):
    """Fused outputs: float base + LoRA, 4-bit base + DoRA, GGUF-layout base + LoRA (q/k rows restored)."""
    root = tmp_path_factory.mktemp("fuse_hf")
    gguf_base = gguf_layout_model_dir(tiny_model, root / "gguf_base")
    cases = {"float-lora": (tiny_model, "lora"), "q4-dora": (tiny_model_q4, "dora"), "gguf-lora": (gguf_base, "lora")}
    out = {"gguf-base": gguf_base}
    for name, (base, kind) in cases.items():
        adapter = random_adapter_dir(base, root / f"{name}-adapter", fine_tune_type=kind, seed=3)
        result = fuse.run(FuseSettings(model=str(base), adapter_path=adapter, out=root / name), RecordingReporter())
        assert result.check.passed
        out[name] = root / name
    return out


def mlx_model(path):
    from mlx_lm.utils import load

    return load(str(path))


@pytest.mark.parametrize("case", ["float-lora", "q4-dora", "gguf-lora"])
def test_transformers_loads_the_fused_model_and_agrees(case, fused_dirs):
    path = fused_dirs[case]
    model, tokenizer = mlx_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf.eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert hf_tokenizer.encode(prompt) == ids
        ours = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(ours - theirs).max() < 1e-3
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("case", ["float-lora", "gguf-lora"])
def test_same_greedy_output_in_mlx_and_transformers(case, fused_dirs):
    from mlx_lm import stream_generate

    path = fused_dirs[case]
    model, tokenizer = mlx_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True)
    ours = [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=12)]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    theirs = out[0, len(ids):].tolist()
    # token ids, not text: the two libraries' detokenizers differ on a leading space
    assert ours and ours == theirs[: len(ours)] and len(theirs) <= len(ours) + 1


def test_gguf_sourced_config_is_standard(fused_dirs):
    config = json.loads((fused_dirs["gguf-lora"] / "config.json").read_text())
    assert "rope_traditional" not in config and "lorakit_source" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"


def test_without_restored_rows_transformers_would_disagree(fused_dirs):
    """The control: transformers on the GGUF-layout base itself computes something else."""
    path = fused_dirs["gguf-base"]
    model, tokenizer = mlx_model(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = tokenizer.encode(PROMPTS[0])
    ours = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() > 0.1
