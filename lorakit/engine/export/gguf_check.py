"""The GGUF check after `--export-gguf`: read the written file back with the `gguf` package, de-quantize its
tensors, run them through the same mlx-lm architecture, and compare with the fused model it was written from.

Two comparisons: with the fused model itself (the drift users see: the type's rounding, reported and bounded
per type), and with the fused model whose weights went through the same rounding in memory (`layout_max_diff`:
only a wrong name, layout, norm offset or hyperparameter moves it, at any type, so its bound is tight).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lorakit.engine.export.gguf_encode import TENSOR_TYPES, encode_matrix
from lorakit.engine.export.gguf_import import to_mlx
from lorakit.engine.export.gguf_read import dequantized_tensors, metadata, open_reader

# Allowed max logit difference per --gguf-type, as a share of the fused model's largest logit (at least 1).
# Measured on SmolLM2-135M-Instruct with a 20-step adapter (share): f16 0.002, bf16 0.010, q8_0 0.036, q5_0 0.33,
# q5_1 0.61, q4_1 0.42, q4_0 0.44; on random tiny models of every family f16 <= 0.016, bf16 <= 0.082 and
# q8_0 <= 0.12 except gemma2 (0.41). A 4/5-bit type moves a small model's logits by a large share of their
# range, so for those the bound catches only gross mistakes; f16, bf16 and q8_0 catch layout mistakes.
TOLERANCE = {"f16": 0.03, "bf16": 0.12, "q8_0": 0.15, "q5_1": 0.8, "q5_0": 0.8, "q4_1": 0.8, "q4_0": 0.8}
LAYOUT_TOLERANCE = 2e-3  # same share; float32 both, only the order of operations differs
GREEDY_TOKENS = 16


@dataclass
class GgufCheck:
    passed: bool
    prompts: int
    positions: int
    max_logit_diff: float
    mean_logit_diff: float
    layout_max_diff: float  # vs the fused weights rounded to the file's types in memory (layout mistakes only)
    layout_tolerance: float
    top1_agreement: float  # share of prompt positions whose most likely next token is the same
    greedy_agreement: float  # share of greedily generated tokens equal to the fused model's, up to the first change
    greedy_tokens: int  # tokens generated per prompt
    tolerance: float


def check_gguf(path: Path, config: dict, weights: dict[str, mx.array], prompts: list[list[int]],
               gguf_type: str) -> GgufCheck:
    """Compare the GGUF at `path` with the fused model (`config` and `weights`, Hugging Face layout). One model
    is held at a time (float32): each is dropped once its logits and greedy tokens are taken."""
    ours, our_tokens = _outputs(build_model(config, weights), prompts)
    theirs, their_tokens = _outputs(gguf_model(path), prompts)
    rounded, _ = _outputs(build_model(config, rounded_weights(weights, config, gguf_type)), prompts, greedy=False)
    layout = max(float(mx.abs(r - t).max()) for r, t in zip(rounded, theirs, strict=True))
    gaps = [mx.abs(a - b) for a, b in zip(ours, theirs, strict=True)]
    positions = sum(g.shape[0] for g in gaps)
    top1 = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs, strict=True))
    same = sum(_common_prefix(a, b) for a, b in zip(our_tokens, their_tokens, strict=True))
    max_diff = max(float(g.max()) for g in gaps)
    scale = max(max(float(mx.abs(a).max()) for a in ours), 1.0)
    tolerance, layout_tolerance = TOLERANCE[gguf_type] * scale, LAYOUT_TOLERANCE * scale
    mean_diff = sum(float(g.sum()) for g in gaps) / sum(g.size for g in gaps)
    return GgufCheck(passed=max_diff <= tolerance and layout <= layout_tolerance, prompts=len(prompts),
                     positions=positions, max_logit_diff=max_diff, mean_logit_diff=mean_diff,
                     layout_max_diff=layout, layout_tolerance=layout_tolerance, top1_agreement=top1 / positions,
                     greedy_agreement=same / (GREEDY_TOKENS * len(prompts)), greedy_tokens=GREEDY_TOKENS,
                     tolerance=tolerance)


def rounded_weights(weights: dict[str, mx.array], config: dict, gguf_type: str) -> dict[str, mx.array]:
    """The fused weights as the file should hold them, rounded by the same `gguf.quants` calls as the export
    (row permutations and norm offsets do not change a matrix's rounding, so the Hugging Face layout stays)."""
    from lorakit.engine.export.gguf_families import BY_MODEL_TYPE, gguf_name, name_map

    names = name_map(BY_MODEL_TYPE[config["model_type"]], config)
    matrix_type = TENSOR_TYPES[gguf_type][1]
    out = {}
    for key, value in weights.items():
        data = np.array(value.astype(mx.float32))
        if data.ndim > 1:
            encoded, kind = encode_matrix(gguf_name(names, key), data, matrix_type)
            data = gguf.quants.dequantize(encoded, kind)
        out[key] = mx.array(data)
    return out


def gguf_model(path: Path) -> nn.Module:
    """The mlx-lm model a GGUF file describes, its tensors de-quantized to float32 by the gguf package."""
    reader = open_reader(path, "--export-gguf")
    weights = {name: mx.array(value) for name, value in dequantized_tensors(reader)}
    config, weights = to_mlx(metadata(reader), weights, path)
    return build_model(config, weights)


def build_model(config: dict, weights: dict[str, mx.array]) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights(list(weights.items()))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _outputs(model: nn.Module, prompts: list[list[int]],
             greedy: bool = True) -> tuple[list[mx.array], list[list[int]]]:
    """Each prompt's logits, and (with `greedy`) the tokens greedy decoding continues it with."""
    from mlx_lm.generate import generate_step

    logits, tokens = [], []
    for ids in prompts:
        out = model(mx.array(ids)[None])[0].astype(mx.float32)
        mx.eval(out)
        logits.append(out)
        if greedy:
            steps = generate_step(mx.array(ids), model, max_tokens=GREEDY_TOKENS)
            tokens.append([int(token) for token, _ in steps])
    return logits, tokens


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
