"""GGUF export and import for every family llama.cpp's converter covers, on tiny random models built here:
fuse --export-gguf -> read back with `gguf` -> load through lorakit's GGUF import -> the fused model's logits."""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest

from lorakit.engine import fuse
from lorakit.engine.export import gguf_check, gguf_encode, gguf_export
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import RunError
from lorakit.settings import FuseSettings
from lorakit.testing import FAMILIES, random_adapter_dir, tiny_model_dir

PROMPT = "How do I reset my password? Open Settings, choose Account."
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
        "gemma2": "gemma2", "phi3": "phi3"}
# tensors only this family has, as llama.cpp names them (layer 0)
OWN_TENSORS = {
    "llama": {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_norm.weight"},
    "mistral": {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"},
    "qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"},
    "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"},
    "gemma": {"blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"},
    "gemma2": {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"},
    "phi3": {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"},
}


def export(root, family, gguf_type="f16", **settings):
    base = tiny_model_dir(root / f"{family}-base", family=family, random_norms=True)
    adapter = random_adapter_dir(base, root / f"{family}-adapter", seed=1)
    out, path = root / f"{family}-{gguf_type}", root / f"{family}-{gguf_type}-gguf" / f"{family}.gguf"
    result = fuse.run(FuseSettings(model=str(base), adapter_path=adapter, out=out, gguf_type=gguf_type,
                                   export_gguf=path, **settings), RecordingReporter())
    return result, out, path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = export(root, family)
        return cache[family]
    return get


def fused_logits(directory):
    from mlx_lm.utils import load

    model, tokenizer = load(str(directory))
    ids = tokenizer.encode(PROMPT)
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32)), ids


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reads_back_with_the_family_names_and_layout(family, exports):
    result, out, path = exports(family)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == ARCH[family]
    tensors = {t.name: t for t in reader.tensors}
    fused = mx.load(str(out / "model.safetensors"))
    assert len(tensors) == len(fused) and OWN_TENSORS[family] <= set(tensors)
    assert "output.weight" not in tensors  # tied embeddings (gemma's always)
    norm = np.array(fused["model.layers.0.input_layernorm.weight"])
    stored = np.array(tensors["blk.0.attn_norm.weight"].data)
    offset = 1.0 if family.startswith("gemma") else 0.0  # llama.cpp folds Gemma's 1 + w into the weight
    np.testing.assert_allclose(stored, norm + offset, rtol=1e-6)
    if family == "gemma2":
        assert reader.fields["gemma2.final_logit_softcapping"].contents() == pytest.approx(30.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lorakit_imports_the_export_with_the_fused_logits(family, exports):
    result, out, path = exports(family)
    ours, ids = fused_logits(out)
    loaded = load_model(FuseSettings(model=str(path)))
    assert loaded.config["model_type"] == {"mistral": "llama"}.get(family, family)
    assert loaded.tokenizer.encode(PROMPT) == ids
    theirs = np.array(loaded.model(mx.array(ids)[None])[0].astype(mx.float32))
    assert np.abs(ours - theirs).max() < 0.02 * max(np.abs(ours).max(), 1.0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_check_ran_and_passed(family, exports):
    result, _, _ = exports(family)
    check = result.gguf.check
    assert check.passed and check.max_logit_diff <= check.tolerance and check.positions > 0
    assert check.layout_max_diff <= check.layout_tolerance, check
    # f16 rounding flips near-ties of a random model's flat distributions now and then, never most of them
    assert check.top1_agreement >= 0.9 and check.greedy_agreement >= 0.25 and check.greedy_tokens == 16, check


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_type_is_written_and_checked(gguf_type, tmp_path, monkeypatch):
    """Each tensor reads back as gguf's own quantizer rounds the fused weight; the check measures the drift.
    A random tiny model drifts by up to its whole logit range at 4/5 bits (SmolLM2-135M: 0.3-0.6 of it), so
    here the 4/5-bit check runs with a bound that only a wrong layout would exceed."""
    if gguf_type.startswith(("q4", "q5")):
        monkeypatch.setitem(gguf_check.TOLERANCE, gguf_type, 2.0)
    result, out, path = export(tmp_path, "qwen2", gguf_type)
    reader = gguf.GGUFReader(path)
    file_type, matrix = gguf_encode.TENSOR_TYPES[gguf_type]
    assert reader.fields["general.file_type"].contents() == file_type
    tensors = {t.name: t for t in reader.tensors}
    wide = gguf.GGMLQuantizationType.Q8_0 if matrix in gguf_encode.NARROW_TYPES else matrix
    assert tensors["token_embd.weight"].tensor_type == wide
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    fused = np.array(mx.load(str(out / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"])
    stored = tensors["blk.1.ffn_up.weight"]
    assert stored.tensor_type == matrix
    expected = gguf.quants.dequantize(gguf.quants.quantize(fused, matrix), matrix)
    np.testing.assert_array_equal(gguf.quants.dequantize(stored.data, matrix), expected)
    check = result.gguf.check
    assert check.passed and 0 < check.max_logit_diff <= check.tolerance, check
    assert check.layout_max_diff <= check.layout_tolerance < check.max_logit_diff, check  # rounding is not layout

    # lorakit's import keeps Q4_0/Q4_1/Q8_0 MLX-quantized (mx.load) and de-quantizes the rest (gguf.quants):
    # either way the same function as the gguf package's float read of the file
    loaded = load_model(FuseSettings(model=str(path)))
    assert ("quantization" in loaded.config) == (gguf_type in ("q8_0", "q4_0", "q4_1"))
    ids = loaded.tokenizer.encode(PROMPT)
    ours = np.array(loaded.model(mx.array(ids)[None])[0].astype(mx.float32))
    theirs = np.array(gguf_check.gguf_model(path)(mx.array(ids)[None])[0].astype(mx.float32))
    assert np.abs(ours - theirs).max() < 0.02 * max(np.abs(theirs).max(), 1.0)


@pytest.mark.parametrize("gguf_type", ["f16", "q4_0"])
def test_a_wrong_layout_fails_the_check_and_ships_nothing(gguf_type, tmp_path, monkeypatch):
    """Without llama.cpp's q/k permutation the file computes another function: exit 1, no GGUF, no --out. At
    4 bits the drift bound alone could not tell (here it is lifted); the comparison with the rounded weights can."""
    monkeypatch.setattr(gguf_export, "to_gguf_layout", lambda family, key, value, config: value)
    monkeypatch.setitem(gguf_check.TOLERANCE, "q4_0", 100.0)
    with pytest.raises(RunError, match=rf"GGUF check failed: .*llama.gguf \({gguf_type}\) .* rounded to {gguf_type} "
                                       r"in memory by [0-9.]+ \(tolerance [0-9.]+: above it the file's layout is wrong"):
        export(tmp_path, "llama", gguf_type)
    assert not (tmp_path / f"llama-{gguf_type}").exists() and not list((tmp_path / f"llama-{gguf_type}-gguf").iterdir())


def test_the_imported_config_is_the_family_config(exports):
    _, out, path = exports("gemma2")
    source = json.loads((out / "config.json").read_text())
    imported = load_model(FuseSettings(model=str(path))).config
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "head_dim"):
        assert imported[key] == pytest.approx(source[key]), key


TEXTS = ["The quick brown fox.", "  spaces   and\ttabs\n\n", "émoji 😀 中文", "<|im_start|>user\nhi<|im_end|>",
         "Numbers 0 1 2 42 2024 3.14"]


def transformers_gguf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    if not transformers.utils.is_gguf_available():
        pytest.skip("transformers here cannot read GGUF files (the gguf package is missing or too old for it)")
    return transformers


# What transformers' GGUF reader (5.x) does not read back, so it computes another model than llama.cpp does:
TRANSFORMERS_GGUF_GAPS = {
    "qwen3": "transformers' GGUF reader ignores qwen3.attention.key_length (head_dim stays 128; here 16)",
    "gemma2": "transformers' GGUF reader leaves query_pre_attn_scalar at 256 (llama.cpp uses head_dim, here 16)",
}


def load_or_skip(auto_class, path, family, **kwargs):
    try:
        return auto_class.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    except ValueError as e:
        if "is not supported yet" not in str(e):
            raise
        pytest.skip(f"transformers cannot load a {ARCH[family]} GGUF ({e})")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_gguf_tokenizer_matches_lorakits(family, exports):
    """The hand-kept GGUF tokenizer rebuild (gguf_tokenizer.py) against transformers' own GGUF loader."""
    transformers = transformers_gguf()
    _, _, path = exports(family)
    ours = load_model(FuseSettings(model=str(path))).tokenizer
    theirs = load_or_skip(transformers.AutoTokenizer, path, family)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_export_like_the_fused_model(family, exports):
    """transformers undoes llama.cpp's q/k permutation and Gemma's norm offset itself: an independent check."""
    transformers = transformers_gguf()
    import torch

    if family in TRANSFORMERS_GGUF_GAPS:
        pytest.skip(TRANSFORMERS_GGUF_GAPS[family])
    _, out, path = exports(family)
    ours, ids = fused_logits(out)
    model = load_or_skip(transformers.AutoModelForCausalLM, path, family, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(ours - theirs).max() < 0.02 * max(np.abs(ours).max(), 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_the_fused_dir(family, exports):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    _, out, _ = exports(family)
    ours, ids = fused_logits(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.encode(PROMPT) == ids
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float().numpy()
    # float32 both; mlx-lm's and torch's tanh-GELU (gemma) differ by up to 1.4e-3 of the largest logit here
    assert np.abs(ours - theirs).max() < 3e-3 * max(np.abs(ours).max(), 1.0)
