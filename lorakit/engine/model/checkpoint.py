"""Training checkpoints: everything needed to continue a run exactly, written atomically with checksums.

Layout under --adapter-path:

    checkpoints/step-000100/
        adapters.safetensors, adapter_config.json   mlx-lm adapter layout (each checkpoint is loadable)
        optimizer.safetensors                        optimizer state (moments; the step drives the LR)
        trainer_state.json                           step, data position (epoch, batch index), best val loss,
                                                     seed (the RNG is re-seeded from (seed, step) every step)
        checksums.json                               sha256 of every file above (written last)
        suspect.json                                 only when the loss on these weights was not finite
    best/                                            adapter with the lowest validation loss so far

A checkpoint is written into a staging directory and renamed into place; one whose checksums are
missing or wrong, or that is marked suspect, is reported and skipped by --resume for the previous one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten

from lorakit.engine.model.adapters import ADAPTER_FILE, save_adapter
from lorakit.engine.reporter import Reporter
from lorakit.errors import UserError
from lorakit.io import read_json, replace_dir, sha256_file, staging_dir, write_json

CHECKPOINTS = "checkpoints"
BEST = "best"
STATE_FILE = "trainer_state.json"
CHECKSUMS = "checksums.json"
SUSPECT = "suspect.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(adapter_path: Path, step: int) -> Path:
    return Path(adapter_path) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(adapter_path: Path) -> list[Path]:
    """Checkpoint directories, oldest first."""
    root = Path(adapter_path) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _save_tree(path: Path, tree: Any) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(tree)))


def save_checkpoint(adapter_path: Path, model: nn.Module, optimizer: optim.Optimizer, adapter_cfg: dict,
                    state: dict, keep_last: int) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep_last`.

    `state` (a TrainState's to_dict()) becomes trainer_state.json.
    """
    target = checkpoint_dir(adapter_path, state["step"])
    staging = staging_dir(target)
    try:
        save_adapter(model, staging, adapter_cfg)
        _save_tree(staging / "optimizer.safetensors", optimizer.state)
        write_json(staging / STATE_FILE, state)
        files = sorted(p.name for p in staging.iterdir())
        write_json(staging / CHECKSUMS, {name: sha256_file(staging / name) for name in files})
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prune(adapter_path, keep_last)
    return target


def prune(adapter_path: Path, keep_last: int) -> None:
    """Drop all but the newest `keep_last` checkpoints."""
    for old in list_checkpoints(adapter_path)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def mark_suspect(ckpt: Path, reason: str) -> None:
    """Flag a checkpoint whose weights gave a non-finite loss: --resume skips it; its files stay."""
    write_json(Path(ckpt) / SUSPECT, {"reason": reason})


def suspect_reason(ckpt: Path) -> str | None:
    path = Path(ckpt) / SUSPECT
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text()).get("reason") or "marked suspect")
    except (OSError, ValueError, AttributeError):
        return "marked suspect"


def save_best(adapter_path: Path, model: nn.Module, adapter_cfg: dict, info: dict) -> Path:
    """Replace best/ with the current adapter (and a note of its step and val loss)."""
    target = Path(adapter_path) / BEST
    staging = staging_dir(target)
    try:
        save_adapter(model, staging, adapter_cfg)
        write_json(staging / "best.json", info)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be used (None if it is complete and intact)."""
    sums_file = Path(ckpt) / CHECKSUMS
    if not sums_file.exists():
        return "incomplete (no checksums.json)"
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, json.JSONDecodeError):
        return "unreadable checksums.json"
    for name in (ADAPTER_FILE, "optimizer.safetensors", STATE_FILE):
        if name not in sums:
            return f"checksums.json does not list {name}"
    for name, digest in sums.items():
        path = Path(ckpt) / name
        if not path.exists():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its checksum (corrupt or partly written)"
    return None


def latest_valid(adapter_path: Path, reporter: Reporter) -> Path | None:
    """The newest intact checkpoint; damaged or suspect newer ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(adapter_path)):
        why = problem(ckpt)
        suspect = suspect_reason(ckpt) if why is None else None
        if why is None and suspect is None:
            return ckpt
        reporter.warn(f"checkpoint {ckpt} is unusable: {why or suspect}; trying the previous one")
    return None


def _assign(tree: Any, dotted: str, value: mx.array) -> bool:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.get(key)
        if node is None:
            return False
    if isinstance(node, list):
        node[int(leaf)] = value
    elif isinstance(node, dict) and leaf in node:
        node[leaf] = value
    else:
        return False
    return True


def _load_tensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:  # not safetensors (a pickle, a cut file), whatever its checksum
        raise UserError(f"{path}: not a readable safetensors file ({e}); resume from another checkpoint "
                        "(--resume-from) or start over (--overwrite)") from None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Restore adapter weights and optimizer state from `ckpt` in place; return its trainer state."""
    weights = _load_tensors(Path(ckpt) / ADAPTER_FILE)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(trainable) or any(weights[k].shape != trainable[k].shape for k in weights):
        raise UserError(f"--resume-from {ckpt}: its adapter does not match this run's settings "
                        f"(different --fine-tune-type, --lora-rank, --num-layers or --target-modules?)")
    model.load_weights(list(weights.items()), strict=False)
    # Fill the optimizer's freshly initialised state in place: the compiled step holds that dict.
    optimizer.init(model.trainable_parameters())
    for key, value in _load_tensors(Path(ckpt) / "optimizer.safetensors").items():
        if not _assign(optimizer.state, key, value):
            raise UserError(f"--resume-from {ckpt}: optimizer state '{key}' does not fit this run "
                            "(a different --optimizer?)")
    mx.eval(model.parameters(), optimizer.state)
    return read_json(Path(ckpt) / STATE_FILE)
