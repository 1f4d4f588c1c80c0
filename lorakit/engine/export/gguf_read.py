"""Reading a .gguf file safely with the `gguf` package: the header first, then tensors de-quantized to float.

MLX's own GGUF reader (`mx.load`) crashes the process on a garbage or truncated file, so every file is checked
here before it reaches MLX: the magic and version (on every load), then the `gguf` reader's parse of every
tensor's extent (before converting).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what llama.cpp and the gguf package read


def check_header(path: Path, flag: str = "--model") -> None:
    """Refuse a file that is not a GGUF of a version llama.cpp reads (exit 2); cheap: the first 8 bytes.
    `open_reader` checks the rest (every tensor inside the file) before MLX reads any."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read the file ({e.strerror})") from None
    if len(head) < 8 or head[:4] != MAGIC:
        raise UserError(f"{flag} {path}: not a GGUF file (it does not start with the GGUF magic bytes); "
                        "check the path, or re-download the file")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in VERSIONS:
        raise UserError(f"{flag} {path}: GGUF version {version} is not supported (supported: "
                        f"{', '.join(map(str, VERSIONS))}); re-convert it with a current llama.cpp")


def open_reader(path: Path, flag: str = "--model"):
    """The `gguf` package's reader; a file cut short or damaged inside is a user error naming the file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is "
                        "truncated or damaged: re-download it") from None
    size = Path(path).stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise UserError(f"{flag} {path}: tensor {tensor.name} ends past the end of the file ({size} "
                            "bytes); the file is truncated: re-download it")
    return reader


def metadata(reader) -> dict[str, Any]:
    """Every metadata field as a plain Python value (strings, numbers, lists)."""
    return {name: _plain(field.contents()) for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _plain(value: Any) -> Any:
    return float(f"{value:.7g}") if isinstance(value, float) else value  # 1e-05, not float32's 9.9999997e-06


def dequantizable(type_name: str) -> bool:
    """Whether `gguf.quants` can de-quantize tensors of this llama.cpp type (it has a class per such type)."""
    from gguf import quants

    return type_name in ("F32", "F16") or isinstance(getattr(quants, type_name, None), type)


def dequantized_tensors(reader) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor as float32 in its logical shape, de-quantized by `gguf.quants` (any type it reads), one at
    a time so a caller can narrow each before the next."""
    from gguf import quants

    for t in reader.tensors:
        yield t.name, quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
