"""The consistency-level scheme (shared/spec/consistency-levels.md).

A bitmap of ``n`` bits is seen as a tree of levels with fan-out
``F = 2**level_bits``: level ``max_level`` is the bitmap itself and bit ``j``
of level ``k`` is the OR of bitmap bits ``[j*G, (j+1)*G)`` with
``G = F**(max_level - k)``.  ``max_level`` is the smallest ``m >= 0`` with
``ceil(n / F**m) <= F``.  A record says which coarse levels of the on-disk
bitmap ``D`` still cover the true bitmap ``T``; recovery widens every set bit
of ``D`` to its whole group at that level, which never loses a change.

Everything here is pure: bits in, bits out.  Bits are uint8 arrays, LSB
first, as the bitmap is stored on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qbitmap.format import AutoclearFeature, BitmapEntry, Image, layout
from qbitmap.format.image import LevelsExtension

MIN_LEVEL_BITS = 1
MAX_LEVEL_BITS = 16
DEFAULT_LEVEL_BITS = 6

# Bits are processed this many bytes at a time when groups are narrower than a byte.
_CHUNK_BYTES = 1 << 20


def max_level(nbits: int, level_bits: int) -> int:
    """The finest level number for a bitmap of *nbits* bits (spec, "Levels")."""
    if not MIN_LEVEL_BITS <= level_bits <= MAX_LEVEL_BITS:
        raise ValueError(f"level_bits must be {MIN_LEVEL_BITS}..{MAX_LEVEL_BITS}, not {level_bits}")
    fanout = 1 << level_bits
    m = 0
    while -(-nbits // (fanout**m)) > fanout:
        m += 1
    return m


def group_bits(level: int, top: int, level_bits: int) -> int:
    """Bitmap bits summarised by one bit of *level* (``F**(top - level)``)."""
    return 1 << (level_bits * (top - level))


def recovery_group_bits(consistent_level: int, top: int, level_bits: int) -> int | None:
    """Bitmap bits made all-ones per set bit by level recovery; None means "all bits"."""
    if consistent_level < 0:
        return None
    return group_bits(consistent_level, top, level_bits)


def widen(bits: np.ndarray, nbits: int, group: int) -> np.ndarray:
    """Every aligned group of *group* bits with any bit set becomes all ones.

    *bits* is a uint8 array of ``ceil(nbits / 8)`` bytes; the result has the
    same shape, with bits past *nbits* clear.
    """
    if group <= 1:
        out = bits.copy()
    elif group % 8 == 0:
        gbytes = group // 8
        nbytes = len(bits)
        ngroups = -(-nbytes // gbytes)
        out = np.zeros(nbytes, dtype=np.uint8)
        for start in range(0, ngroups, max(1, _CHUNK_BYTES // gbytes)):
            stop = min(ngroups, start + max(1, _CHUNK_BYTES // gbytes))
            lo, hi = start * gbytes, min(nbytes, stop * gbytes)
            part = bits[lo:hi]
            padded = np.zeros((stop - start) * gbytes, dtype=np.uint8)
            padded[: len(part)] = part
            hit = padded.reshape(-1, gbytes).any(axis=1)
            out[lo:hi] = np.repeat(np.where(hit, 0xFF, 0).astype(np.uint8), gbytes)[: hi - lo]
    else:
        # Groups of 2 or 4 bits: widen inside each byte.
        out = np.empty_like(bits)
        for lo in range(0, len(bits), _CHUNK_BYTES):
            part = np.unpackbits(bits[lo : lo + _CHUNK_BYTES], bitorder="little")
            hit = part.reshape(-1, group).any(axis=1)
            out[lo : lo + _CHUNK_BYTES] = np.packbits(np.repeat(hit, group), bitorder="little")
    rem = nbits % 8
    if rem and len(out):
        out[-1] &= (1 << rem) - 1
    return out


def level_bits_of(
    bits: np.ndarray, nbits: int, level: int, top: int, level_bits: int
) -> np.ndarray:
    """Bit ``j`` of *level*: whether group ``j`` has a set bit, as a bool array."""
    group = group_bits(level, top, level_bits)
    unpacked = np.unpackbits(bits, bitorder="little")[:nbits]
    ngroups = -(-nbits // group)
    padded = np.zeros(ngroups * group, dtype=np.uint8)
    padded[:nbits] = unpacked
    return np.asarray(padded.reshape(ngroups, group).any(axis=1))


def recover(
    bits: np.ndarray, nbits: int, consistent_level: int, top: int, level_bits: int
) -> np.ndarray:
    """The spec's recovery rule applied to on-disk bits *bits* ("Recovery")."""
    if consistent_level >= top:
        out = bits.copy()
        rem = nbits % 8
        if rem and len(out):
            out[-1] &= (1 << rem) - 1
        return out
    if consistent_level < 0:
        out = np.full(len(bits), 0xFF, dtype=np.uint8)
        rem = nbits % 8
        if rem and len(out):
            out[-1] &= (1 << rem) - 1
        return out
    return widen(bits, nbits, group_bits(consistent_level, top, level_bits))


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a bitmap's consistency-level record is worth."""

    status: str  # "trusted", "stale" or "absent"
    reason: str | None = None  # why stale
    record_offset: int | None = None
    consistent_level: int | None = None
    max_level: int | None = None
    level_bits: int | None = None

    @property
    def trusted(self) -> bool:
        return self.status == "trusted"


def assess(
    image: Image, entries: tuple[BitmapEntry, ...] | list[BitmapEntry]
) -> dict[bytes, Assessment]:
    """Judge the record of every bitmap in *entries* by the spec's trust rules.

    Returns one Assessment per bitmap name; records naming no bitmap are
    reported under their own name with status "stale".
    """
    ext = image.read_levels()
    out: dict[bytes, Assessment] = {e.name: Assessment("absent") for e in entries}
    if ext is None:
        return out
    autoclear = image.header.autoclear
    by_name = {e.name: e for e in entries}
    ext_problem = _extension_problem(ext)
    for record in ext.records:
        reason = ext_problem or _record_problem(image, autoclear, by_name.get(record.name), record)
        out[record.name] = Assessment(
            status="stale" if reason else "trusted",
            reason=reason,
            record_offset=record.offset,
            consistent_level=record.consistent_level,
            max_level=record.max_level,
            level_bits=record.level_bits,
        )
    return out


def _extension_problem(ext: LevelsExtension) -> str | None:
    if ext.version != layout.LEVELS_VERSION:
        return f"the extension has version {ext.version}, qbitmap knows version 1"
    if ext.error is not None:
        return ext.error.reason
    return None


def _record_problem(
    image: Image, autoclear: AutoclearFeature, entry: BitmapEntry | None, record: object
) -> str | None:
    from qbitmap.format import LevelRecord

    assert isinstance(record, LevelRecord)
    if not autoclear & AutoclearFeature.QBITMAP_LEVELS:
        return "autoclear bit 63 is clear: a program that does not maintain the records wrote the image"
    if not autoclear & AutoclearFeature.BITMAPS:
        return "autoclear bit 0 (bitmaps) is clear"
    if entry is None:
        return "no bitmap of that name exists"
    if entry.bitmap_table_offset != record.bitmap_table_offset:
        return (
            f"the record was written for the bitmap table at {record.bitmap_table_offset:#x}, "
            f"the bitmap's table is at {entry.bitmap_table_offset:#x}"
        )
    if entry.granularity_bits != record.granularity_bits:
        return (
            f"the record has granularity_bits {record.granularity_bits}, the bitmap "
            f"{entry.granularity_bits}"
        )
    if not entry.in_use:
        return "the bitmap is not in use, so the record is not needed"
    if not MIN_LEVEL_BITS <= record.level_bits <= MAX_LEVEL_BITS:
        return f"level_bits {record.level_bits} is outside 1..16"
    nbits = -(-image.virtual_size // entry.granularity)
    expected = max_level(nbits, record.level_bits)
    if record.max_level != expected:
        return f"max_level is {record.max_level}, a bitmap of {nbits} bits has {expected}"
    if not -1 <= record.consistent_level <= record.max_level:
        return f"consistent_level {record.consistent_level} is outside -1..{record.max_level}"
    return None
