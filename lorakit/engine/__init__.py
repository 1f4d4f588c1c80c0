"""The MLX engine: one module per subcommand with `run(settings, reporter) -> Result`.

Never prints; reports through `lorakit.engine.reporter.Reporter`. Importing this package loads
OpenBLAS before MLX (see lorakit.blas).
"""

from lorakit.blas import preload as _preload_blas

_preload_blas()
