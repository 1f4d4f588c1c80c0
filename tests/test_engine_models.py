"""The one model loader: local dirs, --dtype / --quantize, errors that name what was given; and the BLAS report."""

import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from lorakit import blas
from lorakit.engine.model.loading import load_model, resolve_model_path
from lorakit.errors import UserError


def _opts(model, **kw):
    return SimpleNamespace(model=str(model), revision=None, trust_remote_code=False, dtype=kw.get("dtype"),
                           quantize=kw.get("quantize"), q_group_size=kw.get("q_group_size", 32))


def _logits(loaded):
    return np.array(loaded.model(mx.array([loaded.tokenizer.encode("The capital of France")])).astype(mx.float32))


def test_loads_a_local_directory(tiny_model):
    loaded = load_model(_opts(tiny_model))
    assert loaded.source == "dir" and loaded.path == tiny_model and loaded.name == str(tiny_model)
    assert loaded.signature["hidden_size"] == 64 and loaded.signature["model_type"] == "llama"
    assert loaded.tokenizer.eos_token_id == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert _logits(loaded).shape[-1] == loaded.config["vocab_size"]


def test_dtype_on_a_quantized_base_dequantizes(tiny_model_q4):
    quantized = load_model(_opts(tiny_model_q4))
    assert isinstance(quantized.model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    loaded = load_model(_opts(tiny_model_q4, dtype="bfloat16"))
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == mx.bfloat16
    assert "quantization" not in loaded.config
    np.testing.assert_allclose(_logits(loaded), _logits(quantized), atol=0.1)


def test_quantize_a_float_base(tiny_model):
    loaded = load_model(_opts(tiny_model, quantize=8, q_group_size=32))
    assert loaded.config["quantization"] == {"group_size": 32, "bits": 8}
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 8
    np.testing.assert_allclose(_logits(loaded), _logits(load_model(_opts(tiny_model))), atol=0.05)


def test_quantize_an_already_quantized_base_is_refused(tiny_model_q4):
    with pytest.raises(UserError, match=r"--quantize 4: the base model .* is already quantized"):
        load_model(_opts(tiny_model_q4, quantize=4))


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=rf"--model {tmp_path}: no config.json in {tmp_path}; expected an mlx-lm"):
        load_model(_opts(tmp_path))


def test_unsupported_architecture(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    with pytest.raises(UserError, match=r"no_such_arch not supported.*config.json model_type.*expected"):
        load_model(_opts(model))


def test_corrupt_safetensors(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"could not load the weights in .*corrupt or incomplete"):
        load_model(_opts(model))


def test_not_a_path_nor_a_repo_id(tmp_path):
    with pytest.raises(UserError, match="no such directory or file, and not a Hugging Face repo id"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="expected a model directory or a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_hub_id_without_network_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(UserError) as info:
        resolve_model_path("lorakit-test/no-such-model-offline")
    message = str(info.value)
    assert message.startswith("--model lorakit-test/no-such-model-offline: not a local path")
    assert "pass a local model directory or a .gguf file" in message and "lorakit.realmodel" in message


def test_missing_gfortran_is_named(monkeypatch):
    def cdll(path, mode=0):
        raise OSError("libgfortran.so.5: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    text = blas.load_first([("/x/cmeel.prefix/lib/libopenblas.so.0", "cmeel-openblas")])
    assert text.startswith("reference (slow matmuls")
    assert "cmeel-openblas could not load: it needs the GNU Fortran runtime libgfortran.so.5" in text
    assert "reinstall lorakit[cpu] (it brings scipy-openblas32, which ships its own)" in text
    assert "apt-get install libgfortran5" in text


def test_prefixed_openblas_is_refused_with_the_pin():
    # scipy-openblas32 >= 0.3.24 exports only scipy_cblas_sgemm & co.; a library without cblas_sgemm stands in
    libm = ctypes.util.find_library("m")
    text = blas.load_first([(libm, "scipy-openblas32")])
    assert text.startswith("reference (slow matmuls")
    assert "scipy-openblas32 has no unprefixed cblas_sgemm for MLX to use" in text
    assert f"install scipy-openblas32=={blas.SCIPY_OPENBLAS_PIN}" in text


def test_the_cpu_extras_openblas_comes_first():
    # the `cpu` extra installs scipy-openblas32 (own Fortran runtime); cmeel-openblas and the system's come after
    sources = [source for _, source in blas._candidates()]
    assert sources and sources[0] == "scipy-openblas32", sources


@pytest.mark.parametrize("off", [False, True])
def test_version_reports_the_blas(off):
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_NO_OPENBLAS"}
    if off:
        env["LORAKIT_NO_OPENBLAS"] = "1"
    out = subprocess.run([sys.executable, "-m", "lorakit", "--version"], env=env, capture_output=True, text=True,
                         check=True).stdout
    blas_line = next(line for line in out.splitlines() if line.startswith("blas: "))
    if off:
        assert blas_line == "blas: reference (LORAKIT_NO_OPENBLAS set)"
    else:
        # the `cpu` extra's scipy-openblas32, whatever else is installed (tests/test_blas_install.py: without
        # the system's libgfortran too); e.g. "blas: OpenBLAS 0.3.23.dev Haswell (scipy-openblas32)"
        assert blas_line.startswith("blas: OpenBLAS 0.3.") and blas_line.endswith("(scipy-openblas32)")
    assert out.startswith("lorakit ") and "\nmlx 0.32" in out and "device: " in out
