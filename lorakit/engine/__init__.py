"""The MLX engine: one module per subcommand with `run(settings, reporter) -> Result`.

Never prints; reports through `lorakit.engine.reporter.Reporter`. Importing this package loads
OpenBLAS before MLX (see lorakit.blas) and keeps third-party advice off stderr (see lorakit.quiet).
"""

from lorakit.blas import preload as _preload_blas
from lorakit.quiet import quiet_third_party as _quiet_third_party

_quiet_third_party()  # before anything imports transformers (mlx-lm, the tokenizer loaders)
_preload_blas()
