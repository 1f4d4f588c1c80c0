"""`lorakit models`: the model directories lorakit converted from .gguf files, with their source and size.

Each lives under `$LORAKIT_CACHE/gguf/<sha256 of the file>` (see export.gguf_import) and is a normal mlx-lm
model directory: `mlx_lm generate --model DIR` loads it, and an adapter trained on the .gguf records it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.engine.reporter import Reporter
from lorakit.io import cache_dir
from lorakit.settings import ModelsSettings


@dataclass
class ConvertedModel:
    path: str  # the mlx-lm model directory
    source_file: str  # the .gguf file's name
    source_path: str | None  # where that file was when converted (older caches did not record it)
    sha256: str
    model_type: str | None
    quantization: dict | None
    size_bytes: int


@dataclass
class ModelsResult:
    cache: str
    models: list[ConvertedModel] = field(default_factory=list)


def run(settings: ModelsSettings, reporter: Reporter) -> ModelsResult:
    del settings, reporter  # nothing to choose, nothing to report while listing
    root = cache_dir() / "gguf"
    result = ModelsResult(cache=str(root))
    for config_file in sorted(root.glob("*/config.json")) if root.is_dir() else []:
        model = _converted(config_file)
        if model is not None:
            result.models.append(model)
    return result


def _converted(config_file: Path) -> ConvertedModel | None:
    """One cached directory, or None for one that is not a converted GGUF (left alone, not listed)."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = config.get("lorakit_source") if isinstance(config, dict) else None
    if not isinstance(source, dict) or source.get("format") != "gguf":
        return None
    directory = config_file.parent
    return ConvertedModel(path=str(directory), source_file=str(source.get("file")), source_path=source.get("path"),
                          sha256=str(source.get("sha256")), model_type=config.get("model_type"),
                          quantization=config.get("quantization"),
                          size_bytes=sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()))
