"""The writer's in-memory side of the consistency-level protocol.

:class:`LevelState` holds the true bitmap ``T`` (what a correct tracker
knows), every coarser level of it, and the ``consistent_level`` the disk
currently claims.  It decides, for a guest write, whether the record must be
lowered first (man/qbitmap-levels.5, WRITER PROTOCOL,
step 2) and remembers which bitmap bytes changed since the last flush (for
the "M KiB changed" flush policy and to write only the data clusters that
changed).

Pure: no I/O.  The Tracker (``qbitmap.track``) and the crash-simulation
model in the tests drive it with their own storage.
"""

from __future__ import annotations

import numpy as np

from qbitmap import levels
from qbitmap.format.bitmap import group_any


class LevelState:
    """``T``, its levels ``0 .. max_level - 1``, and the claimed consistent level.

    Args:
        bits: the bitmap ``T`` starts from (normally ``D``, read from a
            consistent bitmap), uint8 LSB first, ``ceil(nbits / 8)`` bytes.
        nbits: number of bitmap bits.
        level_bits: ``log2`` of the fan-out.
        cluster_size: bytes per bitmap data cluster (to group changed bytes).
    """

    def __init__(self, bits: np.ndarray, nbits: int, level_bits: int, cluster_size: int) -> None:
        nbytes = -(-nbits // 8)
        if len(bits) != nbytes:
            raise ValueError(f"{nbits} bits need {nbytes} bytes, got {len(bits)}")
        self.nbits = nbits
        self.level_bits = level_bits
        self.cluster_size = cluster_size
        self.max_level = levels.max_level(nbits, level_bits)
        self.bits = bits.astype(np.uint8, copy=True)
        rem = nbits % 8
        if rem and nbytes:
            self.bits[-1] &= (1 << rem) - 1
        # levels[k] for k < max_level: bit j of level k, as bools.  Built from
        # the finest level up: each level is the OR of groups of F bits below.
        self._levels: list[np.ndarray] = [np.zeros(0, dtype=bool)] * self.max_level
        if self.max_level:
            below = group_any(self.bits, nbits, 1 << level_bits)
            self._levels[self.max_level - 1] = below
            for k in range(self.max_level - 2, -1, -1):
                below = group_any(
                    np.packbits(below, bitorder="little"), len(below), 1 << level_bits
                )
                self._levels[k] = below
        self.consistent_level = self.max_level
        # Bitmap bytes changed since the last flush, and the clusters holding them.
        self._changed = np.zeros(nbytes, dtype=bool)
        self._dirty_clusters: set[int] = set()
        self.changed_bytes = 0  # distinct bitmap bytes changed since the last flush

    # -- queries -----------------------------------------------------------------

    def group_bits(self, level: int) -> int:
        return levels.group_bits(level, self.max_level, self.level_bits)

    def level(self, k: int) -> np.ndarray:
        """Bit ``j`` of level *k* of ``T`` as a bool array (a copy)."""
        if k == self.max_level:
            return np.unpackbits(self.bits, bitorder="little")[: self.nbits].astype(bool)
        return self._levels[k].copy()

    def coarsest_new_level(self, first: int, end: int) -> int | None:
        """The coarsest level whose bit goes from 0 to 1 if bits ``[first, end)`` are set.

        None when every one of those bits is already set in ``T`` (the write
        changes nothing).  Every level-``k`` group that the range touches will
        hold a set bit afterwards, so a level bit changes exactly when its
        group has none yet.
        """
        self._check_range(first, end)
        if first == end:
            return None
        for k in range(self.max_level):
            g = self.group_bits(k)
            if not self._levels[k][first // g : (end - 1) // g + 1].all():
                return k
        if not self._all_set(first, end):
            return self.max_level
        return None

    def lowered_level(self, first: int, end: int) -> int | None:
        """The consistent level the record must claim before bits ``[first, end)`` are set.

        Spec, step 2: with ``X`` the coarsest level whose bit changes, the
        record must drop to ``X - 1`` when ``X <= c``.  None when the record
        may stay as it is.
        """
        x = self.coarsest_new_level(first, end)
        if x is None or x > self.consistent_level:
            return None
        return x - 1

    @property
    def dirty_clusters(self) -> list[int]:
        """Indices of bitmap data clusters holding a byte changed since the last flush."""
        return sorted(self._dirty_clusters)

    @property
    def has_changes(self) -> bool:
        return self.changed_bytes > 0

    # -- updates -------------------------------------------------------------------

    def set_range(self, first: int, end: int) -> int:
        """Set bits ``[first, end)`` of ``T`` and its levels; returns bytes newly changed."""
        self._check_range(first, end)
        if first == end:
            return 0
        lo, hi = first // 8, (end - 1) // 8 + 1
        old = self.bits[lo:hi].copy()
        self.bits[lo:hi] |= _range_masks(first, end)
        for k in range(self.max_level):
            g = self.group_bits(k)
            self._levels[k][first // g : (end - 1) // g + 1] = True
        diff = np.flatnonzero(old != self.bits[lo:hi]) + lo
        if not len(diff):
            return 0
        fresh = int(np.count_nonzero(~self._changed[diff]))
        self._changed[diff] = True
        self._dirty_clusters.update(
            range(diff[0] // self.cluster_size, diff[-1] // self.cluster_size + 1)
        )
        self.changed_bytes += fresh
        return fresh

    def mark_flushed(self) -> None:
        """``D`` now equals ``T``: the record may claim ``max_level`` again."""
        cs = self.cluster_size
        for i in self._dirty_clusters:
            self._changed[i * cs : (i + 1) * cs] = False
        self._dirty_clusters.clear()
        self.changed_bytes = 0
        self.consistent_level = self.max_level

    # -- helpers -------------------------------------------------------------------

    def _check_range(self, first: int, end: int) -> None:
        if not 0 <= first <= end <= self.nbits:
            raise ValueError(f"bit range [{first}, {end}) is outside 0..{self.nbits}")

    def _all_set(self, first: int, end: int) -> bool:
        lo, hi = first // 8, (end - 1) // 8 + 1
        masks = _range_masks(first, end)
        return bool(((self.bits[lo:hi] & masks) == masks).all())


def _range_masks(first: int, end: int) -> np.ndarray:
    """Per byte of ``[first // 8, (end - 1) // 8]``, the bits of ``[first, end)`` it holds."""
    lo, hi = first // 8, (end - 1) // 8 + 1
    masks = np.full(hi - lo, 0xFF, dtype=np.uint8)
    masks[0] &= (0xFF << (first % 8)) & 0xFF
    masks[-1] &= 0xFF >> (hi * 8 - end)
    return masks


def bit_range(offset: int, length: int, granularity: int, virtual_size: int) -> tuple[int, int]:
    """Bitmap bits ``[first, end)`` covering guest bytes ``[offset, offset + length)``."""
    if offset < 0 or length < 0 or offset + length > virtual_size:
        raise ValueError(
            f"guest range {offset:#x}+{length:#x} is outside the disk ({virtual_size} bytes)"
        )
    if length == 0:
        return 0, 0
    return offset // granularity, (offset + length - 1) // granularity + 1
