"""The pairwise judge's verdict vocabulary: A, B or tie, read in any case, and what swapping the answers does."""

from __future__ import annotations

VERDICTS = ("A", "B", "tie")
_SWAP = {"A": "B", "B": "A", "tie": "tie"}


def parse_verdict(value: object) -> str | None:
    """A verdict from a judge record: A, B or tie in any case (None when it is none of them)."""
    if not isinstance(value, str):
        return None
    return {v.casefold(): v for v in VERDICTS}.get(value.strip().casefold())


def swap_verdict(verdict: str | None) -> str | None:
    """A<->B, tie stays tie, unparseable (None) stays unparseable."""
    return None if verdict is None else _SWAP[verdict]
