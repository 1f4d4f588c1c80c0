"""The `cpu` extra alone gives MLX a fast BLAS on a machine without the GNU Fortran runtime (issue 19, item 7).

A fresh Debian/Ubuntu has no libgfortran.so.5. The test hides this machine's copies: a subprocess in its own
mount namespace (`unshare -m`, private propagation, so nothing leaks out) with an empty file bind-mounted over
each one. There lorakit must still load the OpenBLAS of the `cpu` extra (scipy-openblas32, which ships its own
Fortran runtime), and the dynamic linker's own log (LD_DEBUG=bindings) must show MLX's cblas_sgemm and LAPACK
calls bound to it. Skipped, with the reason, where unshare or mount is not permitted; LORAKIT_REQUIRE_UNSHARE=1
(set by .ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux CPU wheel's BLAS only")

_GFORTRAN_GLOBS = ["/lib/*/libgfortran.so.5*", "/usr/lib/*/libgfortran.so.5*", "/lib64/libgfortran.so.5*",
                   "/usr/lib64/libgfortran.so.5*", "/usr/lib/libgfortran.so.5*", "/lib/libgfortran.so.5*",
                   "/usr/local/lib/libgfortran.so.5*"]
_MOUNT_FAILED = 97

# runs in the namespace: what a user's first lorakit command does (preload, then mlx), on known data
_PROBE = r"""
import ctypes, json, sys
out = {}
try:
    ctypes.CDLL("libgfortran.so.5")
    out["gfortran"] = "visible"
except OSError as e:
    out["gfortran"] = f"hidden: {e}"
from lorakit import blas
cmeel = [c for c in blas._candidates() if c[1] == "cmeel-openblas"]
out["cmeel_alone"] = blas.load_first(cmeel[:1]) if cmeel else None
blas.preload()
out["blas"] = blas.blas_in_use()
import mlx.core as mx
import numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((300, 200)).astype(np.float32)
b = rng.standard_normal((200, 100)).astype(np.float32)
exact = a.astype(np.float64) @ b.astype(np.float64)
out["matmul_max_err"] = float(np.abs(np.array(mx.matmul(mx.array(a), mx.array(b))) - exact).max())
m = rng.standard_normal((64, 64)).astype(np.float32) + 16 * np.eye(64, dtype=np.float32)
inv = np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu))  # LAPACK sgetrf_/sgetri_
out["inv_max_err"] = float(np.abs(inv.astype(np.float64) @ m.astype(np.float64) - np.eye(64)).max())
out["maps"] = sorted({line.split()[-1] for line in open("/proc/self/maps")
                      if "gfortran" in line or "openblas" in line})
print(json.dumps(out))
"""


def _system_gfortran() -> list[str]:
    """Every libgfortran.so.5 the dynamic linker could find: the usual directories and its cache."""
    paths = [p for pattern in _GFORTRAN_GLOBS for p in glob.glob(pattern)]
    ldconfig = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                                                  if os.path.exists(p)), None)
    if ldconfig:
        cache = subprocess.run([ldconfig, "-p"], check=False, capture_output=True, text=True).stdout
        paths += [line.split(" => ")[-1].strip() for line in cache.splitlines()
                  if line.strip().startswith("libgfortran.so.5 ") and " => " in line]
    found = {os.path.realpath(p) for p in paths}
    return sorted(p for p in found if os.path.isfile(p))


def _skip(reason: str) -> None:
    if os.environ.get("LORAKIT_REQUIRE_UNSHARE") == "1":
        pytest.fail(f"LORAKIT_REQUIRE_UNSHARE=1 but {reason}")
    pytest.skip(reason)


def _run_without_gfortran(tmp_path: Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    unshare = shutil.which("unshare")
    if unshare is None:
        _skip("needs unshare(1) (util-linux) to hide libgfortran in a mount namespace")
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "true"], check=False,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        _skip(f"unshare -m is not permitted here ({probe.stderr.strip() or probe.returncode})")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    hide = "".join(f"mount --bind {shlex.quote(str(empty))} {shlex.quote(lib)} || exit {_MOUNT_FAILED}; "
                   for lib in _system_gfortran())
    proc = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", hide + 'exec "$@"', "sh",
                           sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == _MOUNT_FAILED:
        _skip(f"mount --bind is not permitted in the namespace: {proc.stderr.strip()[-300:]}")
    return proc


def test_cpu_extra_gives_openblas_without_system_gfortran(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LORAKIT_NO_OPENBLAS", "LD_PRELOAD")}
    env.update(OPENBLAS_NUM_THREADS="1", LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    proc = _run_without_gfortran(tmp_path, _PROBE, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    # the machine really is one without the GNU Fortran runtime
    assert out["gfortran"].startswith("hidden: "), out
    assert not any(p in _system_gfortran() for p in out["maps"]), out["maps"]
    if out["cmeel_alone"] is not None:  # an install from before: alone it would leave the reference BLAS
        assert out["cmeel_alone"].startswith("reference (slow matmuls"), out["cmeel_alone"]
        assert "libgfortran.so.5" in out["cmeel_alone"]

    # lorakit found the extra's OpenBLAS, which brought its own Fortran runtime
    assert out["blas"].startswith("OpenBLAS 0.3.") and out["blas"].endswith("(scipy-openblas32)"), out["blas"]
    assert any(p.endswith("/scipy_openblas32/lib/libopenblas_python.so") for p in out["maps"]), out["maps"]
    assert any("/scipy_openblas32/lib/libgfortran-" in p for p in out["maps"]), out["maps"]

    # MLX's calls went to it (not to the wheel's reference BLAS/LAPACK), and gave right answers
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    for symbol in ("cblas_sgemm", "sgetrf_"):
        bound = [line for line in log.splitlines() if line.endswith(f"`{symbol}'") and "/libmlx.so " in line]
        assert bound, f"no LD_DEBUG binding of {symbol} from libmlx.so"
        assert all("/scipy_openblas32/lib/libopenblas_python.so " in line for line in bound), bound
    assert out["matmul_max_err"] < 1e-3, out
    assert out["inv_max_err"] < 1e-4, out
