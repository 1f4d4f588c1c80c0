import os

import pytest

import lorakit.engine  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from lorakit.testing import tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random llama (hidden 64, 2 layers) with a BPE tokenizer and chatml template, as a model dir."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_q4(tmp_path_factory):
    """The tiny model with its linear layers 4-bit quantized (group size 32)."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_q4") / "model", quantize_bits=4)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's ~/.cache/lorakit unless a real model cache is set up."""
    if "LORAKIT_CACHE" not in os.environ:
        monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
