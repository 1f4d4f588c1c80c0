"""Load an optimised OpenBLAS before MLX on Linux CPU.

MLX's Linux CPU wheel links netlib's reference BLAS (matmuls 30-60x slower than they should be).
Loading OpenBLAS with RTLD_GLOBAL before the first `import mlx.core` makes its cblas_* symbols win.
Must run before anything imports mlx; `lorakit.engine` calls `preload()` on import.
Set LORAKIT_NO_OPENBLAS=1 to keep the reference BLAS.

Where the OpenBLAS comes from, first that loads wins:
1. scipy-openblas32 0.3.23.x (the `cpu` extra pins it): an auditwheel-repaired OpenBLAS with unprefixed
   cblas_*/LAPACK symbols and its own copies of libgfortran/libquadmath (found through its $ORIGIN run path),
   so it needs nothing from the system. Later versions prefix every symbol with `scipy_`, which MLX cannot use.
2. cmeel-openblas (what older lorakit installed): needs the system's GNU Fortran runtime libgfortran.so.5.
3. the system's libopenblas.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import sysconfig
from pathlib import Path

_state: dict[str, str] = {}

SCIPY_OPENBLAS = "scipy-openblas32"
SCIPY_OPENBLAS_PIN = "0.3.23.293.2"


def _site_dirs() -> list[str]:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    return sorted(r for r in roots if r and Path(r).is_dir())


def _candidates() -> list[tuple[str, str]]:
    found = []
    dirs = _site_dirs()
    for root in dirs:
        libdir = Path(root) / "scipy_openblas32" / "lib"
        if libdir.is_dir():
            # 0.3.23.x ships libopenblas_python.so; later versions only the scipy_-prefixed libscipy_openblas.so,
            # which load_first then names as unusable
            libs = sorted(libdir.glob("libopenblas_python.so")) or sorted(libdir.glob("lib*openblas*.so"))
            found += [(str(lib), SCIPY_OPENBLAS) for lib in libs[:1]]
    for root in dirs:
        lib = Path(root) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if lib.exists():
            found.append((str(lib), "cmeel-openblas"))
    system = ctypes.util.find_library("openblas")
    if system:
        found.append((system, "system"))
    return found


def _cuda_backend() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


def preload() -> None:
    """Load OpenBLAS globally once, when on Linux, on the CPU wheel, and not turned off."""
    if _state:
        return
    if not sys.platform.startswith("linux"):
        _state["blas"] = "Accelerate" if sys.platform == "darwin" else "platform default"
        return
    if os.environ.get("LORAKIT_NO_OPENBLAS", "").lower() in ("1", "true", "yes"):
        _state["blas"] = "reference (LORAKIT_NO_OPENBLAS set)"
        return
    if "mlx.core" in sys.modules:
        _state["blas"] = "unknown (mlx was imported before lorakit could load OpenBLAS)"
        return
    _state["blas"] = load_first(_candidates())


def load_first(candidates: list[tuple[str, str]]) -> str:
    """Load the first loadable OpenBLAS globally; describe what is in use (and why, when it is the reference)."""
    problems = []
    for path, source in candidates:
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            problems.append(_load_problem(source, e))
            continue
        if not hasattr(lib, "cblas_sgemm"):
            # e.g. scipy-openblas32 >= 0.3.24: every symbol carries a scipy_ prefix that MLX does not look for
            problems.append(f"{source} has no unprefixed cblas_sgemm for MLX to use ({Path(path).name})"
                            + (f"; install {SCIPY_OPENBLAS}=={SCIPY_OPENBLAS_PIN} (the `cpu` extra pins it)"
                               if source == SCIPY_OPENBLAS else ""))
            continue
        return f"{_describe(lib)} ({source})"
    hint = "; ".join(problems) if problems else f"install lorakit[cpu] ({SCIPY_OPENBLAS}) or the system's libopenblas"
    where = " for CPU ops" if _cuda_backend() else " on the CPU"
    return f"reference (slow matmuls{where}: {hint})"


def _describe(lib: ctypes.CDLL) -> str:
    """'OpenBLAS 0.3.23.dev SkylakeX': version and the kernel set it runs on this CPU."""
    try:
        lib.openblas_get_config.restype = ctypes.c_char_p
        name = " ".join(lib.openblas_get_config().decode().split()[:2])
    except AttributeError:
        return "OpenBLAS"
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        core = lib.openblas_get_corename().decode().strip()
    except AttributeError:
        core = ""
    return f"{name} {core}" if core else name


def _load_problem(source: str, error: OSError) -> str:
    if "libgfortran" in str(error):
        # cmeel-openblas links the GNU Fortran runtime but does not ship it
        return (f"{source} could not load: it needs the GNU Fortran runtime libgfortran.so.5, which is missing; "
                f"reinstall lorakit[cpu] (it brings {SCIPY_OPENBLAS}, which ships its own), or install it "
                "(Debian/Ubuntu: apt-get install libgfortran5; Fedora: dnf install libgfortran)")
    return f"{source} could not load ({error})"


def blas_in_use() -> str:
    return _state.get("blas", "not loaded yet")
