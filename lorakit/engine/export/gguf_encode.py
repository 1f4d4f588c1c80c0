"""How each --gguf-type stores a model's matrices (the export writes them so; the check rounds the same way)."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
TENSOR_TYPES = {  # --gguf-type -> (general.file_type, the matrices' type)
    "f16": (FT.MOSTLY_F16, Q.F16),
    "bf16": (FT.MOSTLY_BF16, Q.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (FT.MOSTLY_Q4_0, Q.Q4_0),
    "q4_1": (FT.MOSTLY_Q4_1, Q.Q4_1),
    "q5_0": (FT.MOSTLY_Q5_0, Q.Q5_0),
    "q5_1": (FT.MOSTLY_Q5_1, Q.Q5_1),
}
# llama-quantize keeps the token embedding and output matrix at higher precision than 4/5-bit bases (Q6_K);
# the best type `gguf` can write in its place is Q8_0.
WIDE_TENSORS = ("token_embd.weight", "output.weight")
NARROW_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)



def encode_matrix(target: str, data: np.ndarray,
                  matrix_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One matrix as stored: the embedding/output stay Q8_0 under 4/5-bit types; rows a block type cannot
    split into blocks fall back to f16 (as llama.cpp does)."""
    qtype = Q.Q8_0 if target in WIDE_TENSORS and matrix_type in NARROW_TYPES else matrix_type
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, Q.F16), Q.F16
