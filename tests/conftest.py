import os

import pytest

import lorakit.engine  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from lorakit.testing import tiny_model_dir

# Captured before any test's monkeypatch replaces LORAKIT_CACHE with a temp dir.
_REAL_CACHE = os.environ.get("LORAKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorakit")


@pytest.fixture(scope="session")
def real_model_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (`python -m lorakit.realmodel` fetches it).

    Skips when absent, unless LORAKIT_REQUIRE_REAL_MODEL=1 (CI), where absence is a failure.
    LORAKIT_REAL_MODEL overrides the path.
    """
    from pathlib import Path

    from lorakit.realmodel import GGUF_NAME

    path = Path(os.environ.get("LORAKIT_REAL_MODEL") or Path(_REAL_CACHE) / "models" / GGUF_NAME)
    if not path.is_file():
        reason = f"real model not found at {path}; fetch it with `python -m lorakit.realmodel`"
        if os.environ.get("LORAKIT_REQUIRE_REAL_MODEL") == "1":
            pytest.fail(reason + " (LORAKIT_REQUIRE_REAL_MODEL=1)")
        pytest.skip(reason)
    return path


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
