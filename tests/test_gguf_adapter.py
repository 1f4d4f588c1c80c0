"""fuse --gguf-adapter (llama.cpp's LoRA GGUF) and the Ollama Modelfiles beside the GGUF files."""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest

from lorakit.engine import fuse
from lorakit.engine.export.gguf_families import BY_MODEL_TYPE, gguf_name, name_map, to_gguf_layout
from lorakit.engine.export.ollama import modelfile_text
from lorakit.engine.reporter import RecordingReporter
from lorakit.errors import UserError
from lorakit.settings import FuseSettings
from lorakit.testing import CHATML_TEMPLATE, gguf_layout_model_dir, random_adapter_dir, tiny_model_dir


def run_fuse(root, base, adapter, **settings):
    return fuse.run(FuseSettings(model=str(base), adapter_path=adapter, out=root / "fused", **settings),
                    RecordingReporter())


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "from-gguf-layout"])
def test_adapter_gguf_adds_what_the_fuse_added(family, tmp_path):
    """llama.cpp adds alpha / rank * B @ A to each base tensor (in the file's layout): that must be the fused
    tensor minus the base tensor, q/k rows permuted for llama."""
    base = tiny_model_dir(tmp_path / "base", family="llama" if family == "from-gguf-layout" else family)
    if family == "from-gguf-layout":  # trained on a GGUF base: B's rows already in llama.cpp's order
        base = gguf_layout_model_dir(base, tmp_path / "gguf-base")
    adapter = random_adapter_dir(base, tmp_path / "adapter", seed=2, rank=4, alpha=8.0)
    result = run_fuse(tmp_path, base, adapter, gguf_adapter=tmp_path / "lora" / "adapter.gguf")
    reader = gguf.GGUFReader(tmp_path / "lora" / "adapter.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(result.gguf_adapter.alpha)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert result.gguf_adapter.tensors * 2 == len(tensors)

    config = json.loads((base / "config.json").read_text())
    family_ = BY_MODEL_TYPE[config["model_type"]]
    names = name_map(family_, config)
    base_w = mx.load(str(base / "model.safetensors"))
    fused_w = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    hf_config = json.loads((tmp_path / "fused" / "config.json").read_text())
    for key in [k for k in fused_w if k.endswith("proj.weight")]:
        target = gguf_name(names, key)
        a, b = tensors[f"{target}.lora_a"], tensors[f"{target}.lora_b"]
        delta = result.gguf_adapter.alpha / a.shape[0] * (b @ a)
        fused = np.array(to_gguf_layout(family_, key, fused_w[key], hf_config))
        original = base_w[key] if family == "from-gguf-layout" else to_gguf_layout(family_, key, base_w[key], config)
        np.testing.assert_allclose(np.array(original) + delta, fused, atol=2e-5, err_msg=key)


def test_modelfiles_beside_the_ggufs(tmp_path):
    base = tiny_model_dir(tmp_path / "base")
    adapter = random_adapter_dir(base, tmp_path / "adapter", seed=1)
    result = run_fuse(tmp_path, base, adapter, export_gguf=tmp_path / "ollama" / "model.gguf",
                      gguf_adapter=tmp_path / "ollama" / "lora.gguf")
    fused = (tmp_path / "ollama" / "Modelfile").read_text()
    assert result.gguf.modelfile == str(tmp_path / "ollama" / "Modelfile")
    assert fused.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n")
    assert 'PARAMETER stop "<|im_end|>"' in fused and "ADAPTER" not in fused
    lora = (tmp_path / "ollama" / "Modelfile.adapter").read_text()
    assert lora.startswith(f"FROM {base.resolve()}\nADAPTER ./lora.gguf\nTEMPLATE")
    with pytest.raises(UserError, match="Modelfile exists .*--overwrite"):
        run_fuse(tmp_path / "again", base, adapter, export_gguf=tmp_path / "ollama" / "other.gguf")


def test_modelfile_template_and_stops_per_chat_format():
    llama3 = "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}"
    text = modelfile_text("./m.gguf", None, llama3, "<|eot_id|>")
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"" in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1  # eos listed once
    gemma = modelfile_text("./m.gguf", None, "<start_of_turn>{{ role }}", "<eos>")
    assert '{{ if eq .Role "assistant" }}model' in gemma and 'PARAMETER stop "<eos>"' in gemma
    unknown = modelfile_text("./m.gguf", "./a.gguf", "[INST] {{ m }} [/INST]", "</s>")
    assert unknown == 'FROM ./m.gguf\nADAPTER ./a.gguf\nPARAMETER stop "</s>"\n'  # Ollama reads the GGUF's template
    assert "<|im_start|>" in modelfile_text("./m.gguf", None, CHATML_TEMPLATE, None)


def test_dora_has_no_llama_cpp_adapter_form(tmp_path):
    base = tiny_model_dir(tmp_path / "base")
    adapter = random_adapter_dir(base, tmp_path / "adapter", fine_tune_type="dora")
    with pytest.raises(UserError, match="--gguf-adapter: a dora adapter has no llama.cpp LoRA form"):
        run_fuse(tmp_path, base, adapter, gguf_adapter=tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists() and not (tmp_path / "fused").exists()
