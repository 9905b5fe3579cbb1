"""Named one-field edits of real QEMU images: the corruption catalogue.

Each edit takes a copy of the base image (see :func:`make_base`) and changes
one thing, found by parsing the image here with ``struct`` -- independently
of qbitmap, so a bug in qbitmap's reader cannot hide itself.  The catalogue
in ``check/test_catalogue.py`` maps each edit to the finding code and exit
status ``qbitmap check`` must report; ``recover/test_recover_refuse.py``
makes sure recover changes no byte of an image the catalogue calls unsound.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qemu

KiB, MiB = 1024, 1024 * 1024
BITMAPS_EXT = 0x23852875
LEVELS_EXT = 0x71626C76
BASE_SIZE = 100 * MiB


def make_base(path: Path) -> Path:
    """The base image every edit starts from, made by real QEMU tools.

    100 MiB, 64 KiB clusters; bitmaps b0 (64 KiB granularity) and b1 (512 B),
    both with dirty bits (so both have data clusters); guest data, one
    compressed cluster, an internal snapshot s1 and a write after it (so the
    active L1 and the snapshot's L1 point at different L2 tables).
    """
    qemu.create_image(path, BASE_SIZE)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1", granularity=512)
    qemu.qemu_io(
        path,
        "write -P 0x11 0 1M",
        "write -P 0x22 50M 64k",
        "write -P 0x33 99M 64k",
        "write -c -P 0x44 2M 64k",
    )
    qemu.qemu_img("snapshot", "-c", "s1", path)
    qemu.qemu_io(path, "write -P 0x55 3M 64k")
    return path


# -- an independent reader ------------------------------------------------------------------


@dataclass
class Entry:
    offset: int  # file offset of the directory entry
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: bytes


@dataclass
class Layout:
    """Where things are in an image, read with struct."""

    path: Path
    cluster_size: int
    file_size: int
    ext_offset: int  # file offset of the bitmaps extension's 8-byte header
    dir_offset: int
    dir_size: int
    nb_bitmaps: int
    entries: list[Entry]
    l1_offset: int
    refcount_table_offset: int
    snapshots_offset: int

    def u64(self, off: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8))[0]

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name.encode():
                return e
        raise KeyError(name)

    def table(self, name: str) -> list[int]:
        e = self.entry(name)
        with open(self.path, "rb") as f:
            f.seek(e.table_offset)
            return list(struct.unpack(f">{e.table_size}Q", f.read(8 * e.table_size)))

    def data_cluster(self, name: str, index: int = 0) -> int:
        word = self.table(name)[index]
        off = word & 0x00FFFFFFFFFFFE00
        assert off, f"bitmap {name} has no data cluster at table index {index}"
        return off

    @property
    def l2_offset(self) -> int:
        return self.u64(self.l1_offset) & 0x00FFFFFFFFFFFE00

    def l2_entry(self, guest_offset: int, l2: int | None = None) -> int:
        l2 = self.l2_offset if l2 is None else l2
        return self.u64(l2 + 8 * (guest_offset // self.cluster_size))

    def guest_cluster(self, guest_offset: int) -> int:
        return self.l2_entry(guest_offset) & 0x00FFFFFFFFFFFE00

    def compressed_cluster(self, guest_offset: int) -> int:
        word = self.l2_entry(guest_offset)
        assert word >> 62 & 1, "not a compressed cluster"
        shift = 62 - (self.cluster_size.bit_length() - 1 - 8)
        coffset = word & ((1 << shift) - 1)
        return coffset & ~(self.cluster_size - 1)

    def l2_entry_offset(self, guest_offset: int, l2: int | None = None) -> int:
        """File offset of the L2 entry mapping *guest_offset* (active L2 unless *l2*)."""
        l2 = self.l2_offset if l2 is None else l2
        return l2 + 8 * (guest_offset // self.cluster_size)

    @property
    def snapshot_l2(self) -> int:
        return self.u64(self.snapshot_l1) & 0x00FFFFFFFFFFFE00

    @property
    def refcount_block(self) -> int:
        return self.u64(self.refcount_table_offset) & ~0x1FF

    @property
    def snapshot_l1(self) -> int:
        return self.u64(self.snapshots_offset)

    def refcount_entry_offset(self, cluster_offset: int) -> int:
        """File offset of the 16-bit refcount of the cluster at *cluster_offset* (first block)."""
        index = cluster_offset // self.cluster_size
        assert index < self.cluster_size // 2, "outside the first refcount block"
        return self.refcount_block + 2 * index


def layout(path: Path) -> Layout:
    with open(path, "rb") as f:
        head = f.read(4096)
        file_size = f.seek(0, 2)
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    cs = 1 << cluster_bits
    exts = {m: (o, d) for o, m, d in qemu.header_extensions(path)}
    ext_off, data = exts.get(BITMAPS_EXT, (0, b""))
    nb = dir_size = dir_off = 0
    entries: list[Entry] = []
    if len(data) >= 24:
        nb, _res, dir_size, dir_off = struct.unpack(">IIQQ", data[:24])
        with open(path, "rb") as f:
            f.seek(dir_off)
            raw = f.read(dir_size)
        pos = 0
        while pos + 24 <= len(raw):
            tbl, tsize, flags, typ, gbits, nsize, xsize = struct.unpack_from(">QIIBBHI", raw, pos)
            name = raw[pos + 24 + xsize : pos + 24 + xsize + nsize]
            entries.append(Entry(dir_off + pos, tbl, tsize, flags, typ, gbits, name))
            pos += (24 + xsize + nsize + 7) & ~7
    return Layout(
        path=Path(path),
        cluster_size=cs,
        file_size=file_size,
        ext_offset=ext_off,
        dir_offset=dir_off,
        dir_size=dir_size,
        nb_bitmaps=nb,
        entries=entries,
        l1_offset=struct.unpack_from(">Q", head, 40)[0],
        refcount_table_offset=struct.unpack_from(">Q", head, 48)[0],
        snapshots_offset=struct.unpack_from(">Q", head, 64)[0],
    )


# -- writing helpers ------------------------------------------------------------------------


def poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def peek(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def write_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pack_directory(entries: Sequence[tuple[Any, bytes, bytes]]) -> bytes:
    """Bitmap directory bytes for ``(entry, extra_data, name)`` triples, each entry padded to 8.

    An entry is anything with ``table_offset``, ``table_size``, ``flags``, ``type`` and
    ``granularity_bits``; the name and extra data sizes follow from the bytes given.
    """
    blob = b""
    for e, extra, name in entries:
        raw = struct.pack(
            ">QIIBBHI",
            e.table_offset,
            e.table_size,
            e.flags,
            e.type,
            e.granularity_bits,
            len(name),
            len(extra),
        )
        raw += extra + name
        blob += raw + b"\0" * (-len(raw) % 8)
    return blob


def rewrite_directory(lay: Layout, entries: list[tuple[Entry, bytes, bytes]]) -> None:
    """Write new directory entries ``(entry, extra_data, name)`` in place, fix size and count.

    The directory cluster of a QEMU image has room to spare, so entries may grow.
    """
    blob = pack_directory(entries)
    assert len(blob) <= lay.cluster_size, "directory would outgrow its cluster"
    write_bytes(lay.path, lay.dir_offset, blob)
    poke(lay.path, lay.ext_offset + 8, ">I", len(entries))
    poke(lay.path, lay.ext_offset + 16, ">Q", len(blob))


def _entries(lay: Layout) -> list[tuple[Entry, bytes, bytes]]:
    return [(e, b"", e.name) for e in lay.entries]


def _ext(lay: Layout, field_offset: int, fmt: str, value: int) -> None:
    poke(lay.path, lay.ext_offset + 8 + field_offset, fmt, value)


def _entry_field(lay: Layout, name: str, rel: int, fmt: str, value: int) -> None:
    poke(lay.path, lay.entry(name).offset + rel, fmt, value)


def _table_entry(lay: Layout, name: str, index: int, value: int) -> None:
    poke(lay.path, lay.entry(name).table_offset + 8 * index, ">Q", value)


def _past_eof(lay: Layout) -> int:
    return (
        lay.file_size + lay.cluster_size - 1
    ) // lay.cluster_size * lay.cluster_size + 16 * lay.cluster_size


def _set_incompat(lay: Layout, bit: int) -> None:
    poke(lay.path, 72, ">Q", peek(lay.path, 72, ">Q") | 1 << bit)


def _downgrade_to_v2(lay: Layout) -> None:
    """version = 2 and the extension area moved from header_length to byte 72."""
    with open(lay.path, "r+b") as f:
        cluster = bytearray(f.read(lay.cluster_size))
    hlen = struct.unpack_from(">I", cluster, 100)[0]
    area = bytes(cluster[hlen:])
    cluster[4:8] = struct.pack(">I", 2)
    cluster[72:] = area + b"\0" * (hlen - 72)
    write_bytes(lay.path, 0, bytes(cluster))


def _levels_ext(records: list[tuple[int, int, int, int, int, bytes]], version: int = 1) -> bytes:
    """Data of a consistency-level extension: records (table_offset, level, level_bits, max_level, gbits, name)."""
    out = struct.pack(">II", version, len(records))
    for table_offset, level, level_bits, max_level, gbits, name in records:
        rec = (
            struct.pack(
                ">QiBBBBHH", table_offset, level, level_bits, max_level, gbits, 0, len(name), 0
            )
            + name
        )
        out += rec + b"\0" * (-len(rec) % 8)
    return out


def _l2(
    lay: Layout, guest_offset: int, transform: Callable[[int], int], l2: int | None = None
) -> None:
    """Rewrite the L2 entry mapping *guest_offset* as ``transform(old)``."""
    at = lay.l2_entry_offset(guest_offset, l2)
    poke(lay.path, at, ">Q", transform(peek(lay.path, at, ">Q")))


COPIED = 1 << 63
L2_OFFSET = 0x00FFFFFFFFFFFE00


def _names(lay: Layout, *names: bytes) -> None:
    """Rename the bitmaps, in directory order."""
    rewrite_directory(
        lay, [(e, x, n) for (e, x, _old), n in zip(_entries(lay), names, strict=True)]
    )


def _leak_one_cluster(lay: Layout) -> None:
    """Grow the file by one cluster and give that cluster refcount 1: referenced by nothing."""
    end = (lay.file_size + lay.cluster_size - 1) // lay.cluster_size * lay.cluster_size
    with open(lay.path, "r+b") as f:
        f.truncate(end + lay.cluster_size)
    poke(lay.path, lay.refcount_entry_offset(end), ">H", 1)


def _refcount_past_eof(lay: Layout) -> None:
    """Give a cluster two past the end of the file refcount 1, as a writer killed between
    counting the cluster and writing it leaves it; the file keeps its size."""
    past = -(-lay.file_size // lay.cluster_size) + 2
    poke(lay.path, lay.refcount_entry_offset(past * lay.cluster_size), ">H", 1)


def zero_byte_disk_with_in_use_bitmaps(path: Path) -> Path:
    """A crash of a real QEMU writer, then the header's disk size set to 0.

    QEMU itself cannot store a bitmap of a 0-byte disk, so the size is the one edited field.
    """
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    image = qemu.create_image(path, MiB)
    qemu.crash_image(image, [(0, 4096)], bitmaps=("b0", "b1"))
    with open(image, "r+b") as f:
        f.seek(24)  # size
        f.write(struct.pack(">Q", 0))
    return image


# -- the named edits ------------------------------------------------------------------------

Edit = Callable[[Layout], None]

EDITS: dict[str, Edit] = {
    # header extension and directory location
    "ext-length-16": lambda l: poke(l.path, l.ext_offset + 4, ">I", 16),
    "ext-reserved": lambda l: _ext(l, 4, ">I", 1),
    "ext-duplicate": lambda l: qemu.append_header_extension(
        l.path, BITMAPS_EXT, struct.pack(">IIQQ", l.nb_bitmaps, 0, l.dir_size, l.dir_offset)
    ),
    "nb-bitmaps-zero": lambda l: _ext(l, 0, ">I", 0),
    "nb-bitmaps-65536": lambda l: _ext(l, 0, ">I", 65536),
    "nb-bitmaps-one-less": lambda l: _ext(l, 0, ">I", l.nb_bitmaps - 1),
    "nb-bitmaps-one-more": lambda l: _ext(l, 0, ">I", l.nb_bitmaps + 1),
    "dir-offset-unaligned": lambda l: _ext(l, 16, ">Q", l.dir_offset + 8),
    "dir-offset-past-eof": lambda l: _ext(l, 16, ">Q", _past_eof(l)),
    "dir-size-zero": lambda l: _ext(l, 8, ">Q", 0),
    "dir-size-64mib": lambda l: _ext(l, 8, ">Q", 64 * MiB),
    "dir-size-short": lambda l: _ext(l, 8, ">Q", l.dir_size - 8),
    "dir-size-long": lambda l: _ext(l, 8, ">Q", l.dir_size + 8),
    "autoclear-bit0-clear": lambda l: poke(l.path, 88, ">Q", peek(l.path, 88, ">Q") & ~1),
    "ext-removed-bit0-set": lambda l: poke(l.path, l.ext_offset, ">I", 0x51424D58),
    "downgrade-to-v2": _downgrade_to_v2,
    # one directory entry
    "extra-data": lambda l: rewrite_directory(
        l, [(l.entries[0], b"\0" * 8, l.entries[0].name)] + _entries(l)[1:]
    ),
    "table-size-zero": lambda l: _entry_field(l, "b0", 8, ">I", 0),
    "table-offset-zero": lambda l: _entry_field(l, "b0", 0, ">Q", 0),
    "table-offset-unaligned": lambda l: _entry_field(
        l, "b0", 0, ">Q", l.entry("b0").table_offset + 512
    ),
    "table-size-2^27+1": lambda l: _entry_field(l, "b0", 8, ">I", 0x8000001),
    "table-size-8193": lambda l: _entry_field(l, "b0", 8, ">I", 8193),
    "table-size-2": lambda l: _entry_field(l, "b0", 8, ">I", 2),
    "table-size-2-in-use": lambda l: (
        _entry_field(l, "b0", 8, ">I", 2),
        _entry_field(l, "b0", 12, ">I", l.entry("b0").flags | 1),
    ),
    "disk-grown-300mib": lambda l: poke(l.path, 24, ">Q", 300 * MiB),
    "table-offset-past-eof": lambda l: _entry_field(l, "b0", 0, ">Q", _past_eof(l)),
    "granularity-8": lambda l: _entry_field(l, "b0", 17, ">B", 8),
    "granularity-32": lambda l: _entry_field(l, "b0", 17, ">B", 32),
    "flag-extra-data-compatible": lambda l: _entry_field(
        l, "b0", 12, ">I", l.entry("b0").flags | 4
    ),
    "flag-bit-8": lambda l: _entry_field(l, "b0", 12, ">I", l.entry("b0").flags | 0x100),
    "type-2": lambda l: _entry_field(l, "b0", 16, ">B", 2),
    "name-1024-bytes": lambda l: rewrite_directory(
        l, [(l.entries[0], b"", b"n" * 1024)] + _entries(l)[1:]
    ),
    "name-empty": lambda l: rewrite_directory(l, [(l.entries[0], b"", b"")] + _entries(l)[1:]),
    "name-duplicate": lambda l: rewrite_directory(
        l, _entries(l)[:1] + [(l.entries[1], b"", l.entries[0].name)]
    ),
    # names are C strings to QEMU: the bytes before the first NUL
    "name-nul-harmless": lambda l: _names(l, b"b0\0x", b"b1"),
    "name-nul-first": lambda l: _names(l, b"\0ig", b"b1"),
    "name-nul-duplicate": lambda l: _names(l, b"a\0x", b"a\0y"),
    "names-empty-twice": lambda l: _names(l, b"", b""),
    "in-use": lambda l: _entry_field(l, "b0", 12, ">I", l.entry("b0").flags | 1),
    # tables and data
    "table-entry-reserved-bit": lambda l: _table_entry(l, "b0", 0, l.table("b0")[0] | 2),
    "table-entry-ones-with-offset": lambda l: _table_entry(l, "b0", 0, l.table("b0")[0] | 1),
    "table-entry-unaligned": lambda l: _table_entry(l, "b0", 0, l.table("b0")[0] + 512),
    "table-entry-past-eof": lambda l: _table_entry(l, "b0", 0, _past_eof(l)),
    "bits-past-end": lambda l: write_bytes(
        l.path, l.data_cluster("b0") + BASE_SIZE // 65536 // 8 + 1, b"\x01"
    ),
    # refcounts of bitmap clusters
    "data-refcount-0": lambda l: poke(
        l.path, l.refcount_entry_offset(l.data_cluster("b0")), ">H", 0
    ),
    "data-refcount-2": lambda l: poke(
        l.path, l.refcount_entry_offset(l.data_cluster("b0")), ">H", 2
    ),
    "table-refcount-0": lambda l: poke(
        l.path, l.refcount_entry_offset(l.entry("b1").table_offset), ">H", 0
    ),
    "dir-refcount-0": lambda l: poke(l.path, l.refcount_entry_offset(l.dir_offset), ">H", 0),
    "dir-refcount-3": lambda l: poke(l.path, l.refcount_entry_offset(l.dir_offset), ">H", 3),
    # bitmap clusters shared with something else
    "data-on-l1": lambda l: _table_entry(l, "b0", 0, l.l1_offset),
    "data-on-l2": lambda l: _table_entry(l, "b0", 0, l.l2_offset),
    "data-on-snapshot-l2": lambda l: _table_entry(
        l, "b0", 0, l.u64(l.snapshot_l1) & 0x00FFFFFFFFFFFE00
    ),
    "data-on-refcount-table": lambda l: _table_entry(l, "b0", 0, l.refcount_table_offset),
    "data-on-refcount-block": lambda l: _table_entry(l, "b0", 0, l.refcount_block),
    "data-on-snapshot-table": lambda l: _table_entry(l, "b0", 0, l.snapshots_offset),
    "data-on-snapshot-l1": lambda l: _table_entry(l, "b0", 0, l.snapshot_l1),
    "data-on-guest-data": lambda l: _table_entry(l, "b0", 0, l.guest_cluster(50 * MiB)),
    "data-on-compressed-data": lambda l: _table_entry(l, "b0", 0, l.compressed_cluster(2 * MiB)),
    "data-on-other-bitmap-data": lambda l: _table_entry(l, "b0", 0, l.data_cluster("b1")),
    "data-on-own-table": lambda l: _table_entry(l, "b0", 0, l.entry("b0").table_offset),
    "data-on-directory": lambda l: _table_entry(l, "b1", 0, l.dir_offset),
    "tables-shared": lambda l: _entry_field(l, "b1", 0, ">Q", l.entry("b0").table_offset),
    "dir-on-l2": lambda l: _ext(l, 16, ">Q", l.l2_offset),
    # guest data pointing at the bitmap directory (refcount 1, COPIED as for refcount 1)
    "l2-on-directory": lambda l: _l2(l, 50 * MiB, lambda _w: COPIED | l.dir_offset),
    # the image around the bitmaps
    "magic": lambda l: poke(l.path, 0, ">I", 0x12345678),
    "version-0": lambda l: poke(l.path, 4, ">I", 0),
    "cluster-bits-32": lambda l: poke(l.path, 20, ">I", 32),
    # the file cut inside the v3 header (QEMU: 'qcow2 header too short')
    "header-cut-short": lambda l: os.truncate(l.path, 50),
    "incompat-unknown-bit": lambda l: _set_incompat(l, 5),
    "incompat-corrupt-bit": lambda l: _set_incompat(l, 1),
    "incompat-dirty-bit": lambda l: _set_incompat(l, 0),
    "ext-area-overrun": lambda l: poke(l.path, l.ext_offset + 4, ">I", 0x10000),
    "refcount-table-unaligned": lambda l: poke(l.path, 48, ">Q", l.refcount_table_offset + 512),
    "refcount-order-7": lambda l: poke(l.path, 96, ">I", 7),
    "refcount-block-reserved-bit": lambda l: poke(
        l.path, l.refcount_table_offset, ">Q", l.refcount_block | 1
    ),
    "l1-size-zero": lambda l: poke(l.path, 36, ">I", 0),
    "l1-offset-unaligned": lambda l: poke(l.path, 40, ">Q", l.l1_offset + 8),
    "l2-past-eof": lambda l: poke(l.path, l.l1_offset, ">Q", (1 << 63) | _past_eof(l)),
    "l2-on-l1": lambda l: poke(l.path, l.l1_offset, ">Q", (1 << 63) | l.l1_offset),
    "guest-data-refcount-0": lambda l: poke(
        l.path, l.refcount_entry_offset(l.guest_cluster(3 * MiB)), ">H", 0
    ),
    "snapshots-offset-unaligned": lambda l: poke(l.path, 64, ">Q", l.snapshots_offset + 8),
    # one more snapshot than the table holds: the zeros after it are an entry without extra data
    "nb-snapshots-one-more": lambda l: poke(l.path, 60, ">I", peek(l.path, 60, ">I") + 1),
    # single L1 and L2 entries (qemu-img check's check_refcounts_l1/l2, check_oflag_copied)
    "l1-entry-reserved-bit": lambda l: poke(l.path, l.l1_offset, ">Q", l.u64(l.l1_offset) | 2),
    "l1-entry-flags-only": lambda l: poke(l.path, l.l1_offset, ">Q", COPIED),
    "l1-entry-copied-clear": lambda l: poke(
        l.path, l.l1_offset, ">Q", l.u64(l.l1_offset) & ~COPIED
    ),
    "l2-entry-reserved-bit": lambda l: _l2(l, 50 * MiB, lambda w: w | 2),
    "l2-entry-unaligned": lambda l: _l2(l, 50 * MiB, lambda w: w + 512),
    "l2-entry-past-eof": lambda l: _l2(l, 50 * MiB, lambda _w: COPIED | _past_eof(l)),
    "l2-compressed-copied": lambda l: _l2(l, 2 * MiB, lambda w: w | COPIED),
    "l2-entry-copied-clear": lambda l: _l2(l, 3 * MiB, lambda w: w & ~COPIED),
    "l2-entry-copied-on-shared": lambda l: _l2(l, 0, lambda w: w | COPIED),
    "snapshot-l2-entry-reserved-bit": lambda l: _l2(l, 50 * MiB, lambda w: w | 2, l.snapshot_l2),
    "l2-on-refcount-block": lambda l: _l2(l, 50 * MiB, lambda _w: COPIED | l.refcount_block),
    "shared-data-refcount-1": lambda l: poke(
        l.path, l.refcount_entry_offset(l.guest_cluster(0)), ">H", 1
    ),
    "crypt-method-luks": lambda l: poke(l.path, 32, ">I", 2),
    "leaked-cluster": _leak_one_cluster,
    "refcount-past-eof": _refcount_past_eof,
    # consistency-level records
    "levels-orphan": lambda l: qemu.append_header_extension(
        l.path, LEVELS_EXT, _levels_ext([(l.entry("b0").table_offset, 0, 6, 1, 16, b"nope")])
    ),
    "levels-stale": lambda l: qemu.append_header_extension(
        l.path, LEVELS_EXT, _levels_ext([(l.entry("b0").table_offset, 0, 6, 1, 16, b"b0")])
    ),
    "levels-version-2": lambda l: qemu.append_header_extension(
        l.path, LEVELS_EXT, _levels_ext([], version=2)
    ),
}


def apply(base: Path, dest: Path, name: str) -> Path:
    """Copy *base* to *dest* and apply edit *name* to the copy."""
    shutil.copyfile(base, dest)
    EDITS[name](layout(dest))
    return dest
