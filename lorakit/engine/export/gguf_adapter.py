"""`fuse --gguf-adapter`: the adapter alone as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama's ADAPTER).

Laid out as llama.cpp's convert_lora_to_gguf.py writes one: `general.type` adapter, `adapter.type` lora,
`adapter.lora.alpha`, and for each adapted matrix `<base tensor>.lora_a` (rank x in) and `<base tensor>.lora_b`
(out x rank), so that llama.cpp adds alpha / rank * B @ A to the base tensor. mlx-lm's LoRA adds
scale * x @ A @ B with A (in x rank) and B (rank x out): hence alpha = scale * rank and both transposed.
B's rows follow the base tensor's GGUF layout (llama's q/k permutation), unless the base came from a GGUF
and so already has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from lorakit.engine.export.gguf_export import check_exportable
from lorakit.engine.export.gguf_families import gguf_name, name_map
from lorakit.engine.export.hf_export import has_gguf_layout, permute_rows, qk_heads
from lorakit.engine.model.adapters import ADAPTER_FILE, read_adapter_config
from lorakit.errors import UserError


@dataclass
class GgufAdapterExport:
    path: str
    size_bytes: int
    tensors: int  # adapted matrices (each written as a lora_a / lora_b pair)
    alpha: float
    rank: int
    modelfile: str | None = None


def export_gguf_adapter(adapter_dir: Path, base_config: dict, path: Path, name: str) -> GgufAdapterExport:
    """Write the LoRA adapter in `adapter_dir` (trained on the base described by `base_config`) to `path`."""
    config = read_adapter_config(adapter_dir)
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UserError(f"--gguf-adapter: a {kind} adapter has no llama.cpp LoRA form (only LoRA's A and B "
                        "matrices do); drop --gguf-adapter and use --export-gguf, which writes the fused model")
    family = check_exportable(base_config)
    params = config.get("lora_parameters") or {}
    rank, scale = int(params.get("rank", 8)), float(params.get("scale", 20.0))
    weights = mx.load(str(Path(adapter_dir) / ADAPTER_FILE))
    names = name_map(family, base_config)
    permute = family.permutes_qk and not has_gguf_layout(base_config)

    writer = gguf.GGUFWriter(str(path), family.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
    modules = sorted(key.removesuffix(".lora_a") for key in weights if key.endswith(".lora_a"))
    for module in modules:
        target = gguf_name(names, f"{module}.weight")
        if target is None or f"{module}.lora_b" not in weights:
            raise UserError(f"--gguf-adapter: adapter tensor '{module}' in {adapter_dir} has no llama.cpp name "
                            f"for a {base_config.get('model_type')} model")
        lora_a = weights[f"{module}.lora_a"].T
        lora_b = weights[f"{module}.lora_b"].T
        heads = qk_heads(f"{module}.weight", base_config) if permute else None
        if heads:
            lora_b = permute_rows(lora_b, heads)
        writer.add_tensor(f"{target}.lora_a", np.array(lora_a.astype(mx.float32)))
        writer.add_tensor(f"{target}.lora_b", np.array(lora_b.astype(mx.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufAdapterExport(path=str(path), size_bytes=Path(path).stat().st_size, tensors=len(modules),
                             alpha=scale * rank, rank=rank)
