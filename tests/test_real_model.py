"""GGUF import checked on the real SmolLM2-135M-Instruct Q4_1 file against Hugging Face transformers' own
GGUF conversion (tokenizer ids and float32 logits), plus a greedy-generation smoke test."""

import importlib
import os
import time
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lorakit.engine.export.gguf_import import convert_gguf
from lorakit.engine.model.loading import load_model

pytestmark = pytest.mark.real_model

CORPUS = [
    "Hello world!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }  // C++",
    "12345 678.90 3.14159 1,000,000 2024-01-31 0x1F 007",
    "Ünïcödé façade — naïve café, Straße, Ελληνικά, русский",
    "emoji 😀🎉👩‍💻 and CJK 你好，世界 こんにちは 한국어",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "   leading, trailing and    inner runs   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF  \t mixed",
    "It's don't we'll I'M they've",
    "https://example.com/a/b?c=d&e=f#g <div class=\"x\">y</div>",
    "",
    " ",
    "a" * 64,
]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:", "1, 2, 3, 4, 5,"]


def _require(module: str):
    """Import a reference library; in CI (LORAKIT_REQUIRE_REAL_MODEL=1) its absence is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("LORAKIT_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(f"{module} is needed for the reference comparison: pip install -e '.[reference]'")
        pytest.skip(f"{module} not installed (pip install -e '.[reference]')")


@pytest.fixture(scope="module")
def converted(real_model_gguf, tmp_path_factory):
    """The converted model directory, in the session's test cache (converted once per session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
        return convert_gguf(real_model_gguf)


@pytest.fixture(scope="module")
def float_model(real_model_gguf, converted):
    return load_model(SimpleNamespace(model=str(real_model_gguf), dtype="float32", quantize=None))


@pytest.fixture(scope="module")
def reference_dir(real_model_gguf, tmp_path_factory):
    """transformers wants a directory and a file name inside it."""
    ref = tmp_path_factory.mktemp("hf_ref")
    (ref / "model.gguf").symlink_to(real_model_gguf.resolve())
    return ref


def test_second_conversion_is_cached(real_model_gguf, converted):
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_gguf(real_model_gguf) == converted
    assert time.perf_counter() - start < 1.0
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_imported_model_stays_quantized(real_model_gguf, converted):
    loaded = load_model(SimpleNamespace(model=str(real_model_gguf), dtype=None, quantize=None))
    assert loaded.source == "gguf"
    assert loaded.config["rope_traditional"] is True
    assert loaded.config["tie_word_embeddings"] is True
    assert loaded.config["lorakit_source"]["format"] == "gguf"
    # Q8_0 token embedding (tied head), Q4_1 layers: both kept quantized, each at its own width.
    assert loaded.config["quantization"] == {"group_size": 32, "bits": 4,
                                             "model.embed_tokens": {"group_size": 32, "bits": 8}}
    embed, q_proj = loaded.model.model.embed_tokens, loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 8
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4 and q_proj.group_size == 32


def test_tokenizer_ids_match_transformers(float_model, reference_dir):
    transformers = _require("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(reference_dir, gguf_file="model.gguf")
    tokenizer = float_model.tokenizer
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert (tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            == reference.apply_chat_template(chat, add_generation_prompt=True, return_dict=False))


def test_logits_match_transformers(float_model, reference_dir):
    _require("accelerate")
    torch = _require("torch")
    transformers = _require("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        reference_dir, gguf_file="model.gguf", dtype=torch.float32)
    for prompt in PROMPTS:
        ids = float_model.tokenizer.encode(prompt)
        ours = np.array(float_model.model(mx.array([ids])))[0]
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=2e-3, rtol=0, err_msg=prompt)
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_generation_answers_paris(float_model):
    from mlx_lm import generate

    tokenizer = float_model.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    text = generate(float_model.model, tokenizer, prompt, max_tokens=16)
    assert "Paris" in text, text
