"""Deterministic train/valid/test assignment: seeded hash order, whole groups, per-label strata."""

from __future__ import annotations

import hashlib
from collections import defaultdict

SPLITS = ("train", "valid", "test")


def stable_hash(seed: int, key: str) -> bytes:
    """The same key and seed give the same value on every machine and run (unlike hash())."""
    return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()


def assign(groups: list[str], labels: list[str | None], ratios: tuple[float, float, float],
           seed: int) -> list[int]:
    """Split index (0 train, 1 valid, 2 test) for each example.

    Examples sharing a group key stay together. Within each label (stratum; a group counts under its
    first example's label), groups are ordered by a seeded hash and laid along [0, 1): a group goes to
    the split whose ratio interval holds its midpoint, so every label gets the ratios as closely as
    whole groups allow, and the result does not depend on input order.
    """
    members: dict[str, list[int]] = defaultdict(list)
    stratum_of: dict[str, str] = {}
    for i, (group, label) in enumerate(zip(groups, labels)):
        members[group].append(i)
        stratum_of.setdefault(group, "" if label is None else label)
    strata: dict[str, list[str]] = defaultdict(list)
    for group, label in stratum_of.items():
        strata[label].append(group)
    bounds = (ratios[0], ratios[0] + ratios[1])
    result = [0] * len(groups)
    for label in sorted(strata):
        ordered = sorted(strata[label], key=lambda g: stable_hash(seed, g))
        total = sum(len(members[g]) for g in ordered)
        filled = 0
        for group in ordered:
            size = len(members[group])
            middle = (filled + size / 2) / total
            split = 0 if middle < bounds[0] else (1 if middle < bounds[1] else 2)
            for i in members[group]:
                result[i] = split
            filled += size
    return result
