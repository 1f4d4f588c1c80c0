"""No third-party advice or deprecation notices on stderr: lorakit's own warnings and real errors only.

transformers, imported by mlx-lm and by lorakit's tokenizer loaders, logs advice at import time (without
PyTorch: "PyTorch was not found. Models won't be available..."), which users take for an error. Its
advisory warnings are switched off before it is first imported, unless the user set the variable; its
errors, and every lorakit warning, still show.
"""

from __future__ import annotations

import os
import warnings


def quiet_third_party() -> None:
    """Call before transformers or mlx-lm is imported; idempotent."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for module in ("transformers", "mlx_lm", "huggingface_hub", "tokenizers", "jinja2"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
