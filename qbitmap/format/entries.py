"""Table entries, decoded many at a time: L1, L2 (standard, extended, compressed), refcounts.

One decoder per entry kind, vectorised with numpy, shared by everything that
reads them: the reference walk (``references.py``), the guest data view
(``guest.py``) and the allocator of ``qbitmap.store``.

docs/interop/qcow2.rst "Cluster mapping", "Extended L2 Entries",
"Compressed Clusters Descriptor", "Host cluster management"; the cluster
types are QEMU's (``qcow2_get_cluster_type`` in block/qcow2.h):

* bit 62 set: COMPRESSED;
* else bit 0 set (standard entries only): ZERO_ALLOC with a host offset,
  ZERO_PLAIN without;
* else no host offset: UNALLOCATED -- except with an external data file,
  where bit 63 (COPIED) with offset 0 is NORMAL (host offset 0 of the data file);
* else NORMAL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from qbitmap.format import layout


class ClusterType(enum.IntEnum):
    """What an L2 entry describes (QEMU's QCow2ClusterType)."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


_U = np.uint64
L1E_OFFSET = _U(layout.L1E_OFFSET_MASK)
L1E_RESERVED = _U(layout.L1E_RESERVED_MASK)
L2E_OFFSET = _U(layout.L2E_OFFSET_MASK)
L2E_STD_RESERVED = _U(layout.L2E_STD_RESERVED_MASK)
COPIED = _U(layout.QCOW_OFLAG_COPIED)
COMPRESSED = _U(layout.QCOW_OFLAG_COMPRESSED)
ZERO = _U(layout.QCOW_OFLAG_ZERO)
SUBCLUSTER_ALLOC = _U(0xFFFFFFFF)  # extended L2: bit x "subcluster x allocated"
REFT_OFFSET = _U(layout.REFT_OFFSET_MASK)
REFT_RESERVED = _U(layout.REFT_RESERVED_MASK)
BITMAP_TABLE_OFFSET = _U(layout.BITMAP_TABLE_OFFSET_MASK)
BITMAP_TABLE_RESERVED = _U(layout.BITMAP_TABLE_RESERVED_MASK)
BITMAP_TABLE_ALL_ONES = _U(layout.BITMAP_TABLE_ALL_ONES)


def be64(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Big-endian 64-bit table entries as native uint64."""
    return np.frombuffer(data, dtype=">u8").astype(np.uint64)


def to_be64(values: np.ndarray) -> bytes:
    """Native uint64 table entries as big-endian bytes."""
    return np.asarray(values, dtype=np.uint64).astype(">u8").tobytes()


@dataclass(frozen=True, slots=True)
class BitmapTableEntries:
    """Bitmap table entries sorted by QEMU's ``check_table_entry`` (block/qcow2-bitmap.c).

    Boolean masks, one per entry: ``reserved`` (reserved bits set),
    ``ones_with_offset`` (the all-ones bit with a data offset), ``unaligned``
    (a data offset that is not cluster aligned); of the valid entries,
    ``data`` name a data cluster at ``offsets`` and ``ones`` read as all ones
    (the rest read as zeros).
    """

    offsets: np.ndarray
    reserved: np.ndarray
    ones_with_offset: np.ndarray
    unaligned: np.ndarray
    data: np.ndarray
    ones: np.ndarray

    @property
    def invalid(self) -> np.ndarray:
        return self.reserved | self.ones_with_offset | self.unaligned


def bitmap_table_entries(table: np.ndarray, cluster_size: int) -> BitmapTableEntries:
    """Classify every entry of a bitmap table (native uint64 words)."""
    offsets = table & BITMAP_TABLE_OFFSET
    all_ones = (table & BITMAP_TABLE_ALL_ONES) != 0
    reserved = (table & BITMAP_TABLE_RESERVED) != 0
    ones_with_offset = (offsets != 0) & all_ones
    unaligned = (offsets % _U(cluster_size)) != 0
    valid = ~(reserved | ones_with_offset | unaligned)
    return BitmapTableEntries(
        offsets=offsets,
        reserved=reserved,
        ones_with_offset=ones_with_offset,
        unaligned=unaligned,
        data=valid & (offsets != 0),
        ones=valid & (offsets == 0) & all_ones,
    )


def bitmap_table_sound(table: np.ndarray, cluster_size: int) -> bool:
    """Whether every entry passes QEMU's ``check_table_entry``: one pass, for the common case.

    The same rule as :func:`bitmap_table_entries` (``not classes.invalid.any()``),
    in three array operations instead of a dozen: on a sound image every
    table is sound, and most are a few entries long.
    """
    if not len(table):
        return True
    # Reserved bits, or offset bits below the cluster size (an unaligned offset).
    low_offset = layout.BITMAP_TABLE_OFFSET_MASK & (cluster_size - 1)
    if (table & _U(layout.BITMAP_TABLE_RESERVED_MASK | low_offset)).any():
        return False
    ones = (table & BITMAP_TABLE_ALL_ONES) != 0
    return not (table[ones] & BITMAP_TABLE_OFFSET).any()


def valid_data_entries(table: np.ndarray, cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the table entries that pass ``check_table_entry`` and name a data cluster,
    and those data offsets."""
    classes = bitmap_table_entries(table, cluster_size)
    idx = np.flatnonzero(classes.data)
    return idx, classes.offsets[idx]


def cluster_types(words: np.ndarray, *, extended: bool, external_data: bool) -> np.ndarray:
    """The ClusterType (as int8) of each L2 entry's first word."""
    out = np.full(len(words), ClusterType.NORMAL, dtype=np.int8)
    offset = words & L2E_OFFSET
    compressed = (words & COMPRESSED) != 0
    no_offset = offset == 0
    if external_data:
        no_offset &= (words & COPIED) == 0
    out[no_offset] = ClusterType.UNALLOCATED
    if not extended:
        zero = (words & ZERO) != 0
        out[zero & (offset != 0)] = ClusterType.ZERO_ALLOC
        out[zero & (offset == 0)] = ClusterType.ZERO_PLAIN
    out[compressed] = ClusterType.COMPRESSED
    return out


def compressed_ranges(words: np.ndarray, cluster_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Host byte ranges ``(coffset, csize)`` of compressed L2 entries (int64 arrays).

    QEMU's ``qcow2_parse_compressed_l2_entry``: the offset takes the low
    ``62 - (cluster_bits - 8)`` bits, the next ``cluster_bits - 8`` bits count
    the 512-byte sectors after the first, and the data ends at the end of the
    last sector.
    """
    shift = 62 - (cluster_bits - 8)
    coffset = (words & _U((1 << shift) - 1)).astype(np.int64)
    sectors = ((words >> _U(shift)) & _U((1 << (cluster_bits - 8)) - 1)).astype(np.int64) + 1
    return coffset, sectors * 512 - (coffset & 511)


def decode_refcount_block(data: bytes | bytearray | memoryview, refcount_order: int) -> np.ndarray:
    """All refcounts of one refcount block as uint64.

    Entries of 1, 2 and 4 bits are packed LSB first; 8 bits and wider are
    big-endian integers (docs/interop/qcow2.rst "Host cluster management").
    """
    if refcount_order == 6:
        return np.frombuffer(data, dtype=">u8").astype(np.uint64)
    if refcount_order == 5:
        return np.frombuffer(data, dtype=">u4").astype(np.uint64)
    if refcount_order == 4:
        return np.frombuffer(data, dtype=">u2").astype(np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    if refcount_order == 3:
        return raw.astype(np.uint64)
    width = 1 << refcount_order
    per_byte = 8 // width
    shifts = np.arange(per_byte, dtype=np.uint8) * width
    vals = (raw[:, None] >> shifts[None, :]) & ((1 << width) - 1)
    return vals.reshape(-1).astype(np.uint64)


def refcounts_as_int64(refcounts: np.ndarray) -> np.ndarray:
    """Stored refcounts (uint64) as int64, for comparison with counts of references.

    A 64-bit refcount may hold 2^63 or more, which int64 would read as
    negative; no image has that many references, so such a value saturates
    at 2^63 - 1 and still compares as more than any count of references.
    Code that writes a refcount back uses the exact uint64 value.
    """
    return np.minimum(refcounts, np.uint64(np.iinfo(np.int64).max)).astype(np.int64)


def stored_refcounts_of(
    refcounts: np.ndarray, clusters: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The stored refcounts of *clusters* (int64, as :func:`refcounts_as_int64`), and which of
    them *refcounts* covers: a cluster outside it (past the refcount structure, or negative)
    reads as refcount 0."""
    clusters = np.asarray(clusters, dtype=np.int64)
    inside = (clusters >= 0) & (clusters < len(refcounts))
    rc = np.zeros(len(clusters), dtype=np.int64)
    rc[inside] = refcounts_as_int64(refcounts[clusters[inside]])
    return rc, inside


def set_refcount_in_block(block: bytearray, index: int, value: int, refcount_order: int) -> None:
    """Store *value* as refcount entry *index* of a refcount block held in *block*."""
    width = 1 << refcount_order
    if value >= 1 << width or value < 0:
        raise ValueError(f"refcount {value} does not fit in {width} bits")
    if width >= 8:
        nbytes = width // 8
        block[index * nbytes : (index + 1) * nbytes] = value.to_bytes(nbytes, "big")
        return
    per_byte = 8 // width
    byte_index, slot = divmod(index, per_byte)
    shift = slot * width
    mask = ((1 << width) - 1) << shift
    block[byte_index] = (block[byte_index] & ~mask) | (value << shift)
