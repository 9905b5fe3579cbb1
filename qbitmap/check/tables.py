"""Bitmap tables and data: location, QEMU's table entry rules, data inside the file, tail bits.

Sources: qcow2-digest 3.3-3.5 and 4.2; QEMU block/qcow2-bitmap.c
``check_table_entry``, ``bitmap_table_load`` and ``load_bitmap_data``.  Tables
are checked with numpy in one pass.  A table that overlaps one already read is
not read again (the overlap is reported by ``clusters``), so the bytes read
for tables never exceed the file size whatever the directory claims.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

from qbitmap.check.context import Context
from qbitmap.check.directory import geometry_valid
from qbitmap.check.findings import Finding
from qbitmap.format import BitmapEntry, Geometry, Image, layout
from qbitmap.format.bitmap import valid_data_entries
from qbitmap.format.image import BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE

_RESERVED = np.uint64(layout.BITMAP_TABLE_RESERVED_MASK)
_OFFSET = np.uint64(layout.BITMAP_TABLE_OFFSET_MASK)
_ONES = np.uint64(layout.BITMAP_TABLE_ALL_ONES)


def _more(count: int) -> str:
    return "" if count == 1 else f" ({count - 1} more entries likewise)"


def entry_problems(image: Image, entry: BitmapEntry, table: np.ndarray) -> Iterator[Finding]:
    """QEMU's ``check_table_entry`` over a whole table, and data clusters inside the file."""
    cs = image.cluster_size
    name = entry.display_name
    base = entry.bitmap_table_offset
    offsets = table & _OFFSET
    reserved = np.flatnonzero(table & _RESERVED)
    if len(reserved):
        i = int(reserved[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-reserved",
            f"entry {i} of bitmap {name!r}'s table is {int(table[i]):#018x}: reserved bits "
            f"{int(table[i]) & layout.BITMAP_TABLE_RESERVED_MASK:#x} are set{_more(len(reserved))}",
            base + 8 * i,
            "bitmap table entry",
        )
    ones = np.flatnonzero((offsets != 0) & ((table & _ONES) != 0))
    if len(ones):
        i = int(ones[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-ones-with-offset",
            f"entry {i} of bitmap {name!r}'s table has the all-ones bit and data offset "
            f"{int(offsets[i]):#x} at once{_more(len(ones))}",
            base + 8 * i,
            "bitmap table entry",
        )
    unaligned = np.flatnonzero((offsets % np.uint64(cs)) != 0)
    if len(unaligned):
        i = int(unaligned[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-unaligned",
            f"entry {i} of bitmap {name!r}'s table points at {int(offsets[i]):#x}, which is not a "
            f"multiple of the cluster size {cs}{_more(len(unaligned))}",
            base + 8 * i,
            "bitmap table entry",
        )
    idx, data_offsets = valid_data_entries(table, cs)
    outside = np.flatnonzero(data_offsets >= np.uint64(image.file_size))
    if len(outside):
        i = int(idx[outside[0]])
        yield Finding.for_bitmap(
            entry,
            "bitmap-data-outside-file",
            f"entry {i} of bitmap {name!r}'s table points at data cluster {int(table[i] & _OFFSET):#x}, "
            f"which starts past the end of the file ({image.file_size} bytes){_more(len(outside))}",
            base + 8 * i,
            "bitmap table entry",
        )


def tail_problem(image: Image, entry: BitmapEntry, table: np.ndarray) -> Finding | None:
    """Bits past the end of the disk set in the bitmap's last data cluster."""
    if not geometry_valid(entry):
        return None
    geo = Geometry(image.virtual_size, entry.granularity, image.cluster_size)
    if geo.table_size == 0 or len(table) < geo.table_size:
        return None
    last = geo.table_size - 1
    word = int(table[last])
    offset = word & layout.BITMAP_TABLE_OFFSET_MASK
    if (
        offset == 0
        or word & layout.BITMAP_TABLE_RESERVED_MASK
        or word & 1
        or offset % image.cluster_size
    ):
        return None
    if offset >= image.file_size:
        return None
    used_bits = geo.nbits - last * geo.bits_per_cluster
    if used_bits >= geo.bits_per_cluster:
        return None
    # A cluster cut short by the end of the file reads as zeros past it, as in QEMU.
    data = np.frombuffer(
        image.pread(offset, image.cluster_size).ljust(image.cluster_size, b"\0"), np.uint8
    )
    first_byte, rem = divmod(used_bits, 8)
    stray = int(np.count_nonzero(data[first_byte + (1 if rem else 0) :]))
    partial = int(data[first_byte]) >> rem if rem else 0
    if not stray and not partial:
        return None
    return Finding.for_bitmap(
        entry,
        "bitmap-bits-past-end",
        f"bitmap {entry.display_name!r} has bits set past the end of the disk (bit {geo.nbits} on) "
        f"in its last data cluster at {offset:#x}",
        offset + first_byte,
        "bitmap data",
    )


class _Intervals:
    """Byte ranges already read, to refuse re-reading overlapping tables."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


def read_tables(image: Image, entries: list[BitmapEntry]) -> dict[int, np.ndarray]:
    """Tables of *entries* whose location is sane and that overlap no earlier table."""
    cs = image.cluster_size
    seen = _Intervals()
    out: dict[int, np.ndarray] = {}
    for entry in entries:
        off, n = entry.bitmap_table_offset, entry.bitmap_table_size
        if not (
            off and off % cs == 0 and 0 < n <= BME_MAX_TABLE_SIZE and n * cs <= BME_MAX_PHYS_SIZE
        ):
            continue
        if off + n * 8 > image.file_size:
            continue
        end = off + -(-(n * 8) // cs) * cs
        if seen.overlaps(off, end):
            continue
        seen.add(off, end)
        out[entry.index] = image.read_bitmap_table(entry)
    return out


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    for entry in ctx.entries:
        off, n = entry.bitmap_table_offset, entry.bitmap_table_size
        located = off and off % image.cluster_size == 0 and 0 < n <= BME_MAX_TABLE_SIZE
        if (
            located
            and n * image.cluster_size <= BME_MAX_PHYS_SIZE
            and off + n * 8 > image.file_size
        ):
            yield Finding.for_bitmap(
                entry,
                "bitmap-table-outside-file",
                f"bitmap {entry.display_name!r}'s table ({n * 8} bytes at {off:#x}) extends past "
                f"the end of the file ({image.file_size} bytes)",
                entry.offset,
                "bitmap_table_offset",
            )
    ctx.tables = read_tables(image, ctx.entries)
    for entry in ctx.entries:
        table = ctx.tables.get(entry.index)
        if table is None:
            continue
        ctx.data_entries[entry.index] = valid_data_entries(table, image.cluster_size)[0]
        yield from entry_problems(image, entry, table)
        tail = tail_problem(image, entry, table)
        if tail is not None:
            yield tail
