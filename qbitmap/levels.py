"""The consistency-level scheme (man/qbitmap-levels.5): the math, and nothing else.

A bitmap of ``n`` bits is seen as a tree of levels with fan-out
``F = 2**level_bits``: level ``max_level`` is the bitmap itself and bit ``j``
of level ``k`` is the OR of bitmap bits ``[j*G, (j+1)*G)`` with
``G = F**(max_level - k)``.  ``max_level`` is the smallest ``m >= 0`` with
``ceil(n / F**m) <= F``.  A record says which coarse levels of the on-disk
bitmap ``D`` still cover the true bitmap ``T``; recovery widens every set bit
of ``D`` to its whole group at that level, which never loses a change.

Everything here is pure: bits in, bits out, nothing read or written.  Bits
are uint8 arrays, LSB first, as the bitmap is stored on disk.  Whether a
record can be trusted is a rule about an image: ``qbitmap.check.levels``.
"""

from __future__ import annotations

import numpy as np

from qbitmap.format.bitmap import group_any

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


def widen(bits: np.ndarray, nbits: int, group: int) -> np.ndarray:
    """Every aligned group of *group* bits with any bit set becomes all ones.

    *bits* is a uint8 array of ``ceil(nbits / 8)`` bytes; the result has the
    same shape, with bits past *nbits* clear.
    """
    if group <= 1:
        out = bits.copy()
    else:
        gbytes = max(1, group // 8)
        step = max(gbytes, _CHUNK_BYTES // gbytes * gbytes)  # whole groups per chunk
        out = np.empty_like(bits)
        for lo in range(0, len(bits), step):
            part = bits[lo : lo + step]
            hit = group_any(part, len(part) * 8, group)
            if group >= 8:
                wide = np.repeat(np.where(hit, 0xFF, 0).astype(np.uint8), gbytes)
            else:
                wide = np.packbits(np.repeat(hit, group), bitorder="little")
            out[lo : lo + len(part)] = wide[: len(part)]
    rem = nbits % 8
    if rem and len(out):
        out[-1] &= (1 << rem) - 1
    return out


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
