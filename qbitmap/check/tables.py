"""Bitmap tables and data: location, QEMU's table entry rules, data inside the file, tail bits.

QEMU's rules: docs/interop/qcow2.rst "Bitmap table", "Bitmap data";
block/qcow2-bitmap.c ``check_table_entry``, ``bitmap_table_load`` and
``load_bitmap_data``.  Tables are read by
:meth:`qbitmap.format.Image.read_bitmap_tables` (one that overlaps a table
read before is not read again: the overlap is reported by ``clusters``) and
their entries classified by :func:`qbitmap.format.entries.bitmap_table_entries`;
this module words what they find.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.format import BitmapEntry, Geometry, Image, layout
from qbitmap.format.entries import bitmap_table_entries, bitmap_table_sound

_TABLE_ENTRY = "bitmap table entry"


def _more(count: int) -> str:
    return "" if count == 1 else f" ({count - 1} more entries likewise)"


def entry_problems(
    image: Image, entry: BitmapEntry, table: np.ndarray, *, qemu_only: bool = False
) -> Iterator[Finding]:
    """QEMU's ``check_table_entry`` over a whole table, and (unless *qemu_only*) data clusters
    inside the file."""
    cs = image.cluster_size
    if qemu_only and bitmap_table_sound(table, cs):
        return
    name = entry.display_name
    base = entry.bitmap_table_offset
    classes = bitmap_table_entries(table, cs)
    offsets = classes.offsets
    reserved = np.flatnonzero(classes.reserved)
    if len(reserved):
        i = int(reserved[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-reserved",
            f"entry {i} of bitmap {name!r}'s table is {int(table[i]):#018x}: reserved bits "
            f"{int(table[i]) & layout.BITMAP_TABLE_RESERVED_MASK:#x} are set{_more(len(reserved))}",
            base + 8 * i,
            _TABLE_ENTRY,
        )
    ones = np.flatnonzero(classes.ones_with_offset)
    if len(ones):
        i = int(ones[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-ones-with-offset",
            f"entry {i} of bitmap {name!r}'s table has the all-ones bit and data offset "
            f"{int(offsets[i]):#x} at once{_more(len(ones))}",
            base + 8 * i,
            _TABLE_ENTRY,
        )
    unaligned = np.flatnonzero(classes.unaligned)
    if len(unaligned):
        i = int(unaligned[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-entry-unaligned",
            f"entry {i} of bitmap {name!r}'s table points at {int(offsets[i]):#x}, which is not a "
            f"multiple of the cluster size {cs}{_more(len(unaligned))}",
            base + 8 * i,
            _TABLE_ENTRY,
        )
    if qemu_only:
        return
    outside = np.flatnonzero(classes.data & (offsets >= np.uint64(image.file_size)))
    if len(outside):
        i = int(outside[0])
        yield Finding.for_bitmap(
            entry,
            "bitmap-data-outside-file",
            f"entry {i} of bitmap {name!r}'s table points at data cluster {int(offsets[i]):#x}, "
            f"which starts past the end of the file ({image.file_size} bytes){_more(len(outside))}",
            base + 8 * i,
            _TABLE_ENTRY,
        )


def tail_problem(image: Image, entry: BitmapEntry, table: np.ndarray) -> Finding | None:
    """Bits past the end of the disk set in the bitmap's last data cluster."""
    if not entry.granularity_valid:
        return None
    geo = Geometry(image.virtual_size, entry.granularity, image.cluster_size)
    if geo.table_size == 0 or len(table) < geo.table_size:
        return None
    last = geo.table_size - 1
    classes = bitmap_table_entries(table[last : last + 1], image.cluster_size)
    offset = int(classes.offsets[0])
    if not classes.data[0] or offset >= image.file_size:
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


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    if ctx.scope == "open":
        # QEMU's open reads the tables and checks their entries, nothing past them.
        ctx.tables = image.read_bitmap_tables(ctx.entries)
        for entry in ctx.entries:
            table = ctx.tables.get(entry.index)
            if table is not None:
                yield from entry_problems(image, entry, table, qemu_only=True)
        return
    for entry in ctx.entries:
        off, n = entry.bitmap_table_offset, entry.bitmap_table_size
        located = off and off % image.cluster_size == 0 and 0 < n <= layout.BME_MAX_TABLE_SIZE
        if (
            located
            and n * image.cluster_size <= layout.BME_MAX_PHYS_SIZE
            and off + n * 8 > image.file_size
        ):
            yield Finding.for_bitmap(
                entry,
                "bitmap-table-outside-file",
                f"bitmap {entry.display_name!r}'s table ({n * 8} bytes at {off:#x}) extends past "
                f"the end of the file ({image.file_size} bytes)",
                entry.field_offset("bitmap_table_offset"),
                "bitmap_table_offset",
            )
    ctx.tables = image.read_bitmap_tables(ctx.entries)
    for entry in ctx.entries:
        table = ctx.tables.get(entry.index)
        if table is None:
            continue
        yield from entry_problems(image, entry, table)
        tail = tail_problem(image, entry, table)
        if tail is not None:
            yield tail
