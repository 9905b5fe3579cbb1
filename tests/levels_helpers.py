"""Helpers shared by the consistency-level tests of several packages (imported by module name, like qemu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import qemu

from qbitmap import levels
from qbitmap.check.levels import assess
from qbitmap.format import Image, read_bits


class FakeClock:
    """A clock the test moves by hand (``clock.now = ...``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def granules(writes, granularity: int, size: int) -> list[tuple[int, int]]:
    """Guest ranges a perfect bitmap marks for *writes*: whole granules, cut at *size*."""
    out = []
    for off, length in writes:
        start = off // granularity * granularity
        out.append((start, min(size, -(-(off + length) // granularity) * granularity) - start))
    return qemu.merge_extents(out)


def covers(extents, required) -> bool:
    """Every range of *required* lies inside the union of *extents*."""
    merged = qemu.merge_extents(extents)
    return all(
        any(s <= start and start + length <= s + n for s, n in merged)
        for start, length in qemu.merge_extents(required)
    )


def level_recovery(path: Path, name: bytes = b"b0") -> tuple[np.ndarray, str]:
    """What the spec's rule makes of bitmap *name* of a crashed image, and which case applied.

    A consistent bitmap is its own result ("consistent").  An in-use one must
    carry a trusted record -- the Tracker sets in_use only after writing the
    record and removes the record only after clearing in_use -- and is
    widened at the record's level ("level c/max_level").
    """
    with Image.open(path) as img:
        entries = img.read_directory().entries
        entry = next(e for e in entries if e.name == name)
        bits = read_bits(img, entry)
        if not entry.in_use:
            return bits, "consistent"
        a = assess(img, entries)[name]
        assert a.trusted, a.reason
        nbits = -(-img.virtual_size // entry.granularity)
        out = levels.recover(bits, nbits, a.consistent_level, a.max_level, a.level_bits)
        return out, f"level {a.consistent_level}/{a.max_level}"
