"""The float fused model loads with transformers (CPU torch) and agrees with MLX: logits and greedy output.

transformers 4.x (the `reference` extra allows >=4.46) is checked in a subprocess against an install named by
LORAKIT_TRANSFORMERS4: directories made with `pip install --no-deps --target DIR transformers==4.46.3
tokenizers==0.20.3 "huggingface_hub<1"` (no torch: the environment's torch is used), several joined by ':'.
Without it that test skips (LORAKIT_REQUIRE_TRANSFORMERS4=1 makes absence a failure).
"""

import json
import os
import subprocess
import sys

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


def test_tokenizer_config_is_readable_by_transformers_4(fused_dirs):
    """transformers 5 saves `TokenizersBackend` and chat_template.jinja only; 4.x knows neither."""
    config = json.loads((fused_dirs["float-lora"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == (fused_dirs["float-lora"] / "chat_template.jinja").read_text()
    assert "is_local" not in config and "local_files_only" not in config


def test_portable_tokenizer_config_keeps_model_classes_and_renames_list_special_tokens():
    from lorakit.engine.export.hf_export import portable_tokenizer_config

    saved = {"tokenizer_class": "Qwen2Tokenizer", "extra_special_tokens": ["<a>", "<b>"], "is_local": True,
             "chat_template": "T"}
    assert portable_tokenizer_config(saved, "other") == {
        "tokenizer_class": "Qwen2Tokenizer", "additional_special_tokens": ["<a>", "<b>"], "chat_template": "T"}
    named = {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": {"image_token": "<i>"}}
    assert portable_tokenizer_config(named, None) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {"image_token": "<i>"}}


_TRANSFORMERS4_CHECK = """
import json, sys
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {"version": transformers.__version__, "results": {}}
for path in sys.argv[2:]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    result = {"ids": [tokenizer.encode(p) for p in json.loads(sys.argv[1])], "chat": chat}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        with torch.no_grad():
            result["logits"] = [model(torch.tensor([ids])).logits[0].tolist() for ids in result["ids"]]
    out["results"][path] = result
print(json.dumps(out))
"""


def _transformers4_installs() -> list[str]:
    paths = [p for p in os.environ.get("LORAKIT_TRANSFORMERS4", "").split(os.pathsep) if p]
    if not paths:
        reason = "set LORAKIT_TRANSFORMERS4 to a `pip install --no-deps --target` dir of transformers 4.x"
        if os.environ.get("LORAKIT_REQUIRE_TRANSFORMERS4") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return paths


def test_transformers_4_loads_the_fused_model_and_agrees(fused_dirs):
    """The same fused directories under transformers 4.x: tokenizer ids, chat template and logits as MLX."""
    cases = ["float-lora", "q4-dora", "gguf-lora"]
    for install in _transformers4_installs():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [install, os.environ.get("PYTHONPATH")]))}
        run = subprocess.run([sys.executable, "-c", _TRANSFORMERS4_CHECK, json.dumps(PROMPTS),
                              *(str(fused_dirs[c]) for c in cases)],
                             env=env, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.splitlines()[-1])
        assert out["version"].startswith("4."), out["version"]
        for case in cases:
            model, tokenizer = mlx_model(fused_dirs[case])
            result = out["results"][str(fused_dirs[case])]
            assert result["ids"] == [tokenizer.encode(p) for p in PROMPTS]
            assert result["chat"] == tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
            for ids, theirs in zip(result["ids"], result.get("logits", [])):
                ours = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))
                assert np.abs(ours - np.array(theirs)).max() < 1e-3, (out["version"], case)
