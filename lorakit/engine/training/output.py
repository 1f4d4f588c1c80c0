"""Where a run writes: --adapter-path itself, or, with --overwrite on a non-empty one, a staging directory
beside it that replaces the old contents only once the new run has a good checkpoint (or finishes).

Also the clean-up of what a killed run left inside --adapter-path (called under its lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorakit.engine.model import checkpoint as ckpt
from lorakit.engine.model.adapters import ADAPTER_FILE, CONFIG_FILE
from lorakit.engine.training.result import CURVE, METRICS, REPORT, SETTINGS_FILE
from lorakit.errors import LorakitError
from lorakit.io import replace_dir

_RANDOM = r"[a-z0-9_]{8}"  # the random part of tempfile's names (io.atomic_path, io.staging_dir)
_FILES = "|".join(re.escape(n) for n in (ADAPTER_FILE, CONFIG_FILE, METRICS, REPORT, CURVE, SETTINGS_FILE))
_TOP_TEMP = re.compile(rf"\.({_FILES})\.{_RANDOM}\.(tmp|safetensors)")
_BEST_STAGING = re.compile(rf"\.{ckpt.BEST}\.{_RANDOM}\.staging")
_STEP_STAGING = re.compile(rf"\.step-\d+\.{_RANDOM}\.staging")
_STEP_OLD = re.compile(r"\.(step-\d+)\.old")


class RunOutput:
    """The run's output directory: `final` (--adapter-path), written through `staging` until `publish`."""

    def __init__(self, final: Path, staging: Path | None = None) -> None:
        self.final, self.staging = Path(final), staging

    @property
    def path(self) -> Path:
        """Where the run writes now."""
        return self.staging or self.final

    def publish(self) -> bool:
        """Swap the staged run in for the old contents of --adapter-path; True when it did just now."""
        if self.staging is None:
            return False
        replace_dir(self.staging, self.final)
        self.staging = None
        return True

    @contextlib.contextmanager
    def kept_on_failure(self) -> Iterator[None]:
        """A run that ends before `publish` leaves the old --adapter-path as it was and drops its staging."""
        try:
            yield
        except BaseException as e:
            if self.staging is None:
                raise
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            if isinstance(e, LorakitError):
                raise type(e)(f"{e} (--overwrite: nothing of this run was kept; the previous contents of "
                              f"{self.final} are left as they were)") from None
            raise


def remove_leftovers(out: Path) -> None:
    """Staging directories and temp files that a run killed mid-save left inside --adapter-path; a best/ or
    checkpoint caught between the two renames of a swap (only `.NAME.old` left) is put back."""
    out = Path(out)
    if not out.is_dir():
        return
    _sweep(out, (_TOP_TEMP, _BEST_STAGING))
    _put_back(out / f".{ckpt.BEST}.old", out / ckpt.BEST)
    checkpoints = out / ckpt.CHECKPOINTS
    if checkpoints.is_dir():
        _sweep(checkpoints, (_STEP_STAGING,))
        for child in list(checkpoints.iterdir()):
            if m := _STEP_OLD.fullmatch(child.name):
                _put_back(child, checkpoints / m.group(1))


def _sweep(directory: Path, patterns: tuple[re.Pattern, ...]) -> None:
    for child in list(directory.iterdir()):
        if any(p.fullmatch(child.name) for p in patterns):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _put_back(old: Path, target: Path) -> None:
    if not old.is_dir():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, target)
