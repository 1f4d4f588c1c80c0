"""File helpers shared by every command: atomic writes, JSON/JSONL, the no-overwrite rule, output locks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the output gets the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad JSON or non-objects are UserErrors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_new_dir(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Refuse an existing non-empty directory unless overwrite; never delete it before the new one is ready."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{flag} {path}: directory exists and is not empty; pass --overwrite to replace it")
    return path


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written staging directory into place, swapping out any old one last."""
    target = Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)


def staging_dir(target: str | Path) -> Path:
    """A fresh temp directory beside `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, default ~/.cache/lorakit (converted GGUF models, the real model)."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser()


def check_output_location(out: str | Path, out_flag: str, inputs: Iterable[tuple[str, str | Path | None]],
                          inside_ok: Iterable[str] = ()) -> None:
    """Refuse an output that is, contains or sits inside an input (replacing it would delete that input).

    `inputs` are (flag, path) pairs; names that are not local paths (a hub id) are skipped. Flags in
    `inside_ok` may hold the output (eval writes into its adapter directory by design).
    """
    target = Path(out).expanduser().resolve()
    for flag, value in inputs:
        if value is None or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        if target == source:
            raise UserError(f"{out_flag} {out}: is an input ({flag} {value}); choose another {out_flag}")
        if target in source.parents:
            raise UserError(f"{out_flag} {out}: contains an input ({flag} {value}); replacing it would delete "
                            f"that input. Choose another {out_flag}")
        if source in target.parents and source.is_dir() and flag not in inside_ok:
            raise UserError(f"{out_flag} {out}: is inside an input ({flag} {value}); keep outputs outside "
                            f"their inputs. Choose another {out_flag}")


def _lock_file(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


@contextlib.contextmanager
def output_lock(target: str | Path, flag: str) -> Iterator[None]:
    """Hold `target`'s lock (a `.NAME.lock` file beside it with pid and host) for the block.

    A second run into the same output is refused (exit 2) while the first is alive; a lock whose process
    is gone is taken over, and the staging directories that process left behind are removed.
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_file(target)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder and _holder_alive(holder):
                raise UserError(f"{flag} {target}: in use by another lorakit run (pid {holder.get('pid')} on "
                                f"{holder.get('host')} since {holder.get('since')}); wait for it, or delete "
                                f"{lock} if that run is gone") from None
            lock.unlink(missing_ok=True)  # stale: its process has died
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"{flag} {target}: could not take the lock {lock}")
    try:
        _remove_leftovers(target)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    """What a killed run left beside `target` (only ever called under its lock): staging directories go;
    a previous output caught mid-swap (`.NAME.old` with no NAME) is put back."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.staging")
    for leftover in target.parent.iterdir():
        if pattern.fullmatch(leftover.name) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
