"""lorakit.engine.fuse on the tiny model: fused logits match base+adapter, for float and 4-bit bases, LoRA and DoRA."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from lorakit.engine import fuse
from lorakit.engine.export.hf_export import unpermute_rows
from lorakit.engine.model.adapters import load_adapter
from lorakit.engine.model.loading import load_model
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import RunError, UserError
from lorakit.settings import FuseSettings
from lorakit.testing import gguf_layout_model_dir, random_adapter_dir

PROMPT = "What is the capital of France? The capital of France is Paris."


@pytest.fixture(scope="module")
def tiny_gguf_layout(tiny_model, tmp_path_factory):
    return gguf_layout_model_dir(tiny_model, tmp_path_factory.mktemp("gguf_layout") / "model")


@pytest.fixture(scope="module")
def adapters(tiny_model, tiny_model_q4, tiny_gguf_layout, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    bases = {"float": tiny_model, "q4": tiny_model_q4, "gguf": tiny_gguf_layout}
    return {(base, kind): random_adapter_dir(path, root / f"{base}-{kind}", fine_tune_type=kind)
            for base, path in bases.items() for kind in ("lora", "dora")}


def settings(model, adapter, out, **kw) -> FuseSettings:
    return FuseSettings(model=str(model), adapter_path=adapter, out=out, **kw)


def logits(model, tokenizer, text=PROMPT) -> mx.array:
    out = model(mx.array(tokenizer.encode(text))[None])[0].astype(mx.float32)
    mx.eval(out)
    return out


def adapted_logits(model_dir, adapter) -> mx.array:
    loaded = load_model(FuseSettings(model=str(model_dir)))
    load_adapter(loaded, adapter)
    return logits(loaded.model, loaded.tokenizer)


def load_output(path):
    from mlx_lm.utils import load

    return load(str(path))


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("base", ["float", "q4"])
def test_fused_model_matches_base_plus_adapter(base, kind, adapters, tiny_model, tiny_model_q4, tmp_path):
    model_dir = {"float": tiny_model, "q4": tiny_model_q4}[base]
    adapter = adapters[(base, kind)]
    reporter = RecordingReporter()
    result = fuse.run(settings(model_dir, adapter, tmp_path / "fused"), reporter)

    assert result.check.passed and result.check.max_logit_diff < 1e-4
    assert result.check.adapter_effect > 1.0  # the check had something to find
    assert result.fused_layers == 14 and result.fine_tune_type == kind
    assert result.dtype == "float32" and result.quantization is None and result.transformers_compatible
    model, tokenizer = load_output(tmp_path / "fused")
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert not any("lora" in k or k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))
    # an independent base+adapter run, not the engine's own numbers
    assert mx.abs(logits(model, tokenizer) - adapted_logits(model_dir, adapter)).max().item() < 1e-4

    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "lorakit.yaml",
            "fuse.json"} <= set(result.files)
    assert result.size_bytes == sum(p.stat().st_size for p in (tmp_path / "fused").iterdir())
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((tmp_path / "fused" / "fuse.json").read_text())["check"]["passed"] is True
    assert not list(tmp_path.glob(".*staging"))


def test_requantize_reports_the_error_it_adds(adapters, tiny_model, tmp_path):
    result = fuse.run(settings(tiny_model, adapters[("float", "lora")], tmp_path / "q4", requantize=4),
                      RecordingReporter())
    assert result.quantization == {"group_size": 64, "bits": 4}
    assert result.check.passed and not result.transformers_compatible
    err = result.requantize_error
    assert 0 < err.mean <= err.max and 0 <= err.top1_agreement <= 1
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    model, tokenizer = load_output(tmp_path / "q4")
    assert model.layers[0].self_attn.q_proj.bits == 4
    reference = adapted_logits(tiny_model, adapters[("float", "lora")])
    gap = mx.abs(logits(model, tokenizer) - reference).max().item()
    assert 0 < gap < 10 * err.max  # the shipped model is the quantized fuse, with an error of the reported size


def test_requantize_keeps_a_quantized_bases_group_size(adapters, tiny_model_q4, tmp_path):
    result = fuse.run(settings(tiny_model_q4, adapters[("q4", "dora")], tmp_path / "q8", requantize=8),
                      RecordingReporter())
    assert result.quantization == {"group_size": 32, "bits": 8}
    assert result.requantize_error.top1_agreement > 0.9  # 8 bits barely move the logits


def test_dtype_float16(adapters, tiny_model, tmp_path):
    result = fuse.run(settings(tiny_model, adapters[("float", "lora")], tmp_path / "f16", dtype="float16"),
                      RecordingReporter())
    assert result.dtype == "float16" and result.check.passed
    assert result.check.tolerance > 1e-3  # float16 earns a looser bound than float32
    model, _ = load_output(tmp_path / "f16")
    assert model.layers[0].mlp.up_proj.weight.dtype == mx.float16


def test_gguf_layout_base_gets_hugging_face_rows(adapters, tiny_model, tiny_gguf_layout, tmp_path):
    original, tokenizer = load_output(tiny_model)
    permuted, _ = load_output(tiny_gguf_layout)
    # the stand-in is faithful: permuted rows + traditional RoPE compute the same function
    assert mx.abs(logits(original, tokenizer) - logits(permuted, tokenizer)).max().item() < 1e-4

    result = fuse.run(settings(tiny_gguf_layout, adapters[("gguf", "lora")], tmp_path / "fused"),
                      RecordingReporter())
    assert result.qk_rows_restored and result.check.passed and result.check.max_logit_diff < 1e-4
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "rope_traditional" not in config and "lorakit_source" not in config
    fused = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    base = mx.load(str(tiny_gguf_layout / "model.safetensors"))
    lora = mx.load(str(adapters[("gguf", "lora")] / "adapters.safetensors"))
    scale = 8.0 / 4  # random_adapter_dir's alpha / rank
    for name, heads in (("q_proj", 4), ("k_proj", 2), ("v_proj", None)):
        prefix = f"model.layers.1.self_attn.{name}"
        merged = base[f"{prefix}.weight"] + (scale * lora[f"{prefix}.lora_b"].T) @ lora[f"{prefix}.lora_a"].T
        expected = unpermute_rows(merged, heads) if heads else merged  # W + BA, then rows in HF order
        assert mx.abs(fused[f"{prefix}.weight"] - expected).max().item() < 1e-5


def test_a_fuse_that_misses_the_adapter_fails_and_ships_nothing(adapters, tiny_model, tmp_path, monkeypatch):
    def drop_adapter(model):  # a broken fuse: the base layers without their deltas
        from mlx.utils import tree_unflatten

        plain = [(name, m.linear) for name, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(plain))
        return len(plain)

    monkeypatch.setattr(fuse, "_fuse_layers", drop_adapter)
    gguf = tmp_path / "model.gguf"
    with pytest.raises(RunError, match="verification failed"):
        fuse.run(settings(tiny_model, adapters[("float", "lora")], tmp_path / "fused", export_gguf=gguf),
                 RecordingReporter())
    assert not (tmp_path / "fused").exists() and not gguf.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging dir or temp file left behind


def test_refuses_to_overwrite_without_flag(adapters, tiny_model, tmp_path):
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        fuse.run(settings(tiny_model, adapters[("float", "lora")], out), RecordingReporter())
    assert (out / "keep.txt").read_text() == "precious"

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"old")
    with pytest.raises(UserError, match="--export-gguf .*--overwrite"):
        fuse.run(settings(tiny_model, adapters[("float", "lora")], tmp_path / "new", export_gguf=gguf),
                 RecordingReporter())
    assert gguf.read_bytes() == b"old"

    result = fuse.run(settings(tiny_model, adapters[("float", "lora")], out, overwrite=True), RecordingReporter())
    assert result.check.passed and not (out / "keep.txt").exists()


def test_missing_adapter_is_a_user_error(tiny_model, tmp_path):
    with pytest.raises(UserError, match="--adapter-path"):
        fuse.run(settings(tiny_model, tmp_path / "nope", tmp_path / "fused"), RecordingReporter())


def test_an_untrained_adapter_is_flagged(tiny_model, tmp_path):
    adapter = random_adapter_dir(tiny_model, tmp_path / "zero", b_scale=0.0)
    reporter = RecordingReporter()
    result = fuse.run(settings(tiny_model, adapter, tmp_path / "fused"), reporter)
    assert result.check.adapter_effect == 0
    assert any(kind == "warn" and "Is this adapter trained?" in msg for kind, msg in reporter.events)


def test_without_verification(adapters, tiny_model, tmp_path):
    result = fuse.run(settings(tiny_model, adapters[("float", "dora")], tmp_path / "fused", verify=False),
                      RecordingReporter())
    assert result.check is None and (tmp_path / "fused" / "model.safetensors").exists()
