"""GGUF import on tiny GGUF files written in the test from the tiny llama (llama.cpp's layout and metadata)."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import quants
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_load_model

from lorakit.engine.export.gguf_import import convert_gguf
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import UserError

GT = gguf.GGMLQuantizationType
NAMES = {  # mlx-lm -> GGUF, per layer
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TEXTS = ["The quick brown fox.", "What is the capital of France?", "def add(a, b):\n    return a + b\n",
         "Numbers 0 1 2 42 2024 3.14", "  spaces   and\ttabs\n\n", "émoji 😀 中文", "<|im_start|>user\nhi<|im_end|>"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row permutation (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    out = {"token_embd.weight": weights.pop("model.embed_tokens.weight"),
           "output_norm.weight": weights.pop("model.norm.weight")}
    for name, value in weights.items():
        _, _, layer, *module, _ = name.split(".")
        gguf_name = f"blk.{layer}.{NAMES['.'.join(module)]}.weight"
        if module[-1] == "q_proj":
            value = _permute(value, config["num_attention_heads"])
        elif module[-1] == "k_proj":
            value = _permute(value, config["num_key_value_heads"])
        out[gguf_name] = value
    return out


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: unk/bos/eos, 256 byte tokens, then pieces best-first."""
    from tokenizers import SentencePieceBPETokenizer

    from lorakit.testing import _CORPUS

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(_CORPUS * 20, vocab_size=300, show_progress=False)
    pieces = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1]) if t != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def write_gguf(path: Path, model_dir: Path, *, weight_type: str = "F32", tokenizer: str = "gpt2",
               arch: str = "llama", random_type: dict[str, str] | None = None) -> Path:
    """The tiny model as llama.cpp writes it; `random_type` stores the named tensors as that type (random bytes)."""
    config = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if tokenizer == "gpt2":
        tok = json.loads((model_dir / "tokenizer.json").read_text())
        vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
        w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
        w.add_eos_token_id(tok["model"]["vocab"]["<|im_end|>"])
        w.add_pad_token_id(tok["model"]["vocab"]["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template(json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"])
    else:
        tokens, scores, types = _spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    qtype = GT[weight_type]
    for name, value in _gguf_tensors(model_dir).items():
        if name in (random_type or {}):
            kind = GT[random_type[name]]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = np.random.default_rng(0).integers(0, 255, (value.shape[0], value.shape[1] // block * size),
                                                    dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=kind)
        elif value.ndim == 1 or qtype == GT.F32:
            w.add_tensor(name, value.astype(np.float32))
        else:
            w.add_tensor(name, quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    write_gguf(out / "tiny-f32.gguf", tiny_model)
    write_gguf(out / "tiny-q8_0.gguf", tiny_model, weight_type="Q8_0")
    write_gguf(out / "tiny-q4_0.gguf", tiny_model, weight_type="Q4_0")
    return out


def _opts(model, **kw):
    return SimpleNamespace(model=str(model), dtype=kw.get("dtype"), quantize=kw.get("quantize"), q_group_size=64)


def _logits(loaded, text="What is the capital of France?"):
    ids = loaded.tokenizer.encode(text)
    return np.array(loaded.model(mx.array([ids])).astype(mx.float32))[0]


def test_f32_gguf_matches_the_original_model(tiny_model, gguf_dir):
    original = load_model(_opts(tiny_model))
    imported = load_model(_opts(gguf_dir / "tiny-f32.gguf"))
    assert imported.source == "gguf" and imported.path.parent.name == "gguf"
    assert imported.config["rope_traditional"] is True and imported.config["tie_word_embeddings"] is True
    assert "quantization" not in imported.config
    assert imported.config["lorakit_source"]["file"] == "tiny-f32.gguf"
    # llama.cpp's permuted q/k rows + traditional RoPE compute the same thing as the original layout.
    np.testing.assert_allclose(_logits(imported), _logits(original), atol=1e-4)
    for text in TEXTS:
        assert imported.tokenizer.encode(text) == original.tokenizer.encode(text), text
    chat = [{"role": "user", "content": "hi"}]
    assert (imported.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
            == original.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    assert imported.tokenizer.eos_token_id == original.tokenizer.eos_token_id


@pytest.mark.parametrize(("name", "bits"), [("tiny-q8_0.gguf", 8), ("tiny-q4_0.gguf", 4)])
def test_quantized_gguf_stays_quantized_and_trains(tiny_model, gguf_dir, name, bits):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    imported = load_model(_opts(gguf_dir / name))
    assert imported.config["quantization"] == {"group_size": 32, "bits": bits}
    q_proj = imported.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits and q_proj.group_size == 32
    assert isinstance(imported.model.model.embed_tokens, nn.QuantizedEmbedding)
    # MLX's unpacking of the blocks equals the gguf library's reference de-quantization
    tensor = next(t for t in gguf.GGUFReader(gguf_dir / name).tensors if t.name == "blk.0.attn_q.weight")
    expected = quants.dequantize(tensor.data, tensor.tensor_type)
    ours = mx.dequantize(q_proj.weight, q_proj.scales.astype(mx.float32), q_proj.biases.astype(mx.float32),
                         group_size=32, bits=bits)
    np.testing.assert_allclose(np.array(ours), expected, atol=1e-6)
    original = _logits(load_model(_opts(tiny_model)))
    np.testing.assert_allclose(_logits(imported), original, atol=0.2 if bits == 8 else 1.0)
    # mlx-lm loads the converted directory by itself too
    model, _ = mlx_load_model(imported.path)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.QuantizedLinear)

    # QLoRA: LoRA layers on the quantized base get gradients
    imported.model.freeze()
    linear_to_lora_layers(imported.model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    ids = mx.array([imported.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])

    def loss(model):
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean()

    value, grads = nn.value_and_grad(imported.model, loss)(imported.model)
    lora_grads = [g for k, g in tree_flatten(grads) if "lora_b" in k]  # B starts at zero, so A gets none yet
    assert lora_grads and np.isfinite(value.item())
    assert any(float(mx.abs(g).sum()) > 0 for g in lora_grads)


def test_dtype_dequantizes_in_float32(tiny_model, gguf_dir):
    quantized = load_model(_opts(gguf_dir / "tiny-q8_0.gguf"))
    dequantized = load_model(_opts(gguf_dir / "tiny-q8_0.gguf", dtype="float32"))
    assert "quantization" not in dequantized.config
    assert type(dequantized.model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert dequantized.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    np.testing.assert_allclose(_logits(dequantized), _logits(quantized), atol=1e-2)  # quantized runs in float16


def test_second_load_uses_the_cache(gguf_dir):
    first = convert_gguf(gguf_dir / "tiny-f32.gguf")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    reporter = RecordingReporter()
    assert convert_gguf(gguf_dir / "tiny-f32.gguf", reporter) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not reporter.events  # no "converting" message the second time
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    config = json.loads((first / "config.json").read_text())
    assert config["lorakit_source"]["sha256"] == first.name


def test_failed_conversion_leaves_no_cache(gguf_dir, tiny_model, tmp_path, monkeypatch):
    import lorakit.engine.export.gguf_import as gi

    path = write_gguf(tmp_path / "crash.gguf", tiny_model, tokenizer="llama")  # content not converted before

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as mp, pytest.raises(OSError):
        mp.setattr(gi, "write_json", crash)
        convert_gguf(path)
    cache = Path(os.environ["LORAKIT_CACHE"]) / "gguf"
    assert not [p for p in cache.iterdir() if p.name.startswith(".") and "staging" in p.name]
    assert (convert_gguf(path) / "config.json").is_file()  # and it converts fine afterwards


def test_bf16_tensors_stay_bfloat16(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "tiny-bf16.gguf", tiny_model, weight_type="BF16")
    imported = load_model(_opts(path))
    weight = imported.model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == mx.bfloat16
    original = mx.load(str(tiny_model / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert mx.array_equal(weight, original.astype(mx.bfloat16))


def test_sentencepiece_tokenizer_matches_transformers(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = write_gguf(tmp_path / "spm.gguf", tiny_model, tokenizer="llama")
    ours = load_tokenizer(convert_gguf(path))  # (the tiny model's embedding is smaller than this vocabulary)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in TEXTS + ["Hello", " leading space", "x\n\ny", "ünïcode 🎉", "<s>inline special</s> after"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1  # add_bos defaults on for SentencePiece vocabularies
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("émoji 😀"), skip_special_tokens=True) == "émoji 😀"  # byte fallback


def test_gpt2_tokenizer_matches_transformers(gguf_dir):
    transformers = pytest.importorskip("transformers")
    ours = load_model(_opts(gguf_dir / "tiny-f32.gguf")).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="tiny-f32.gguf")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


def test_q5_tensors_are_dequantized_by_the_gguf_package(tiny_model, tmp_path):
    """mx.load cannot unpack Q5_0; the gguf package's de-quantizer reads the file instead, with a notice."""
    path = write_gguf(tmp_path / "q5.gguf", tiny_model, weight_type="Q5_0")
    reporter = RecordingReporter()
    model_dir = convert_gguf(path, reporter)
    assert any("has Q5_0 tensors, which MLX's reader cannot unpack" in str(e) for e in reporter.events)
    stored = mx.load(str(model_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    original = np.array(mx.load(str(tiny_model / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"])
    expected = quants.dequantize(quants.quantize(original, GT.Q5_0), GT.Q5_0)
    assert stored.dtype == mx.float16
    np.testing.assert_allclose(np.array(stored.astype(mx.float32)), expected, atol=1e-3)
    assert np.abs(expected - original).max() > 1e-3  # the check above sees Q5_0's rounding, not the float


def test_unsupported_quant_type_is_refused(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "q8_1.gguf", tiny_model, random_type={"blk.0.attn_v.weight": "Q8_1"})
    with pytest.raises(UserError, match=r"Q8_1 are not supported; supported: Q4_0, Q4_1, Q8_0"):
        convert_gguf(path)


def test_k_quant_tensors_are_dequantized_with_a_notice(tmp_path):
    from lorakit.testing import tiny_model_dir

    wide = tiny_model_dir(tmp_path / "wide", hidden_size=256, num_layers=1)  # K-quant rows are 256 wide
    path = write_gguf(tmp_path / "k.gguf", wide, random_type={"blk.0.attn_v.weight": "Q6_K"})
    reporter = RecordingReporter()
    model_dir = convert_gguf(path, reporter)
    assert any("de-quantized to float16 (1 Q6_K)" in str(e) for e in reporter.events)
    weights = mx.load(str(model_dir / "model.safetensors"))
    assert weights["model.layers.0.self_attn.v_proj.weight"].dtype == mx.float16


def test_truncated_and_foreign_files_are_refused(gguf_dir, tmp_path):
    data = (gguf_dir / "tiny-f32.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.gguf").write_text("not a gguf file\n")
    for name in ("cut.gguf", "text.gguf"):
        with pytest.raises(UserError, match=rf"{name}: (not a GGUF file|.*truncated).*re-download"):
            convert_gguf(tmp_path / name)
    with pytest.raises(UserError, match="GGUF file not found"):
        load_model(_opts(tmp_path / "missing.gguf"))


def test_unsupported_architecture_is_refused(tiny_model, tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", tiny_model, arch="falcon")
    with pytest.raises(UserError, match=r"architecture 'falcon' is not supported; supported: llama, qwen2"):
        convert_gguf(path)
