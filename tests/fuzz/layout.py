"""An independent reader of qcow2 structures for the mutation engine.

Parses a (valid, QEMU-made) base image with ``struct`` only -- never with
qbitmap, so a bug in qbitmap's reader cannot steer the mutations away from
itself -- and records where every structure and every field lives: the
header fields, each header extension, the bitmaps extension, every bitmap
directory entry and its bitmap table, the active and snapshot L1 tables,
every L2 table and entry, the refcount table and blocks, the snapshot table,
and which role each host cluster plays.  Offsets are file offsets in bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BITMAPS_EXT = 0x23852875
FEATURE_TABLE_EXT = 0x6803F857
BACKING_FORMAT_EXT = 0xE2792ACA
DATA_FILE_EXT = 0x44415441
CRYPTO_EXT = 0x0537BE77

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1, L2 (standard), bitmap table entries
COPIED = 1 << 63
COMPRESSED = 1 << 62

#: (name, file offset, struct format) of every header field.
HEADER_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("magic", 0, ">I"),
    ("version", 4, ">I"),
    ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"),
    ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"),
    ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"),
    ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"),
    ("snapshots_offset", 64, ">Q"),
    ("incompatible_features", 72, ">Q"),
    ("compatible_features", 80, ">Q"),
    ("autoclear_features", 88, ">Q"),
    ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
    ("compression_type", 104, ">B"),
)

#: (name, offset inside the entry, struct format) of a bitmap directory entry's fixed part.
DIR_ENTRY_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("bitmap_table_offset", 0, ">Q"),
    ("bitmap_table_size", 8, ">I"),
    ("flags", 12, ">I"),
    ("type", 16, ">B"),
    ("granularity_bits", 17, ">B"),
    ("name_size", 18, ">H"),
    ("extra_data_size", 20, ">I"),
)

#: (name, offset inside the entry, struct format) of a snapshot table entry's fixed part.
SNAPSHOT_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("l1_table_offset", 0, ">Q"),
    ("l1_size", 8, ">I"),
    ("id_str_size", 12, ">H"),
    ("name_size", 14, ">H"),
    ("date_sec", 16, ">I"),
    ("date_nsec", 20, ">I"),
    ("vm_clock_nsec", 24, ">Q"),
    ("vm_state_size", 32, ">I"),
    ("extra_data_size", 36, ">I"),
)


@dataclass
class Extension:
    offset: int  # of its 8-byte header (magic, length)
    magic: int
    length: int


@dataclass
class DirEntry:
    index: int
    offset: int  # of the entry
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: bytes
    extra: bytes


@dataclass
class Snapshot:
    index: int
    offset: int
    l1_table_offset: int
    l1_size: int
    size: int  # bytes of the whole entry, padded


@dataclass
class L2Entry:
    offset: int  # file offset of the (first) 8-byte word
    value: int
    l2_offset: int  # the L2 table it lives in
    active: bool  # reachable from the active L1


@dataclass
class Layout:
    """Where everything is in one image."""

    size: int  # file size
    cluster_size: int
    header: dict[str, int]
    extensions: list[Extension]
    ext_area_end: int
    bitmaps_ext: Extension | None
    nb_bitmaps: int = 0
    dir_offset: int = 0
    dir_size: int = 0
    entries: list[DirEntry] = field(default_factory=list)
    extended_l2: bool = False
    l1_tables: list[tuple[int, int, bool]] = field(default_factory=list)  # (offset, size, active)
    l2_tables: dict[int, bool] = field(default_factory=dict)  # offset -> reachable from active L1
    l2_entries: list[L2Entry] = field(default_factory=list)
    refcount_blocks: list[int] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    roles: dict[int, set[str]] = field(default_factory=dict)  # cluster index -> roles

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def refcount_bits(self) -> int:
        return 1 << self.header["refcount_order"]

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    def clusters_with(self, role: str) -> list[int]:
        return sorted(c for c, r in self.roles.items() if role in r)

    def refcount_location(self, cluster: int) -> tuple[int, int, int] | None:
        """(file offset of the byte(s), bit shift, width in bits) of *cluster*'s refcount."""
        bits = self.refcount_bits
        per_block = self.cluster_size * 8 // bits
        table_index, block_index = divmod(cluster, per_block)
        if table_index >= len(self.refcount_blocks) or not self.refcount_blocks[table_index]:
            return None
        block = self.refcount_blocks[table_index]
        if bits >= 8:
            return block + block_index * bits // 8, 0, bits
        byte, slot = divmod(block_index * bits, 8)
        return block + byte, slot, bits  # sub-byte refcounts: LSB first inside the byte


def _u64(buf: bytes, off: int) -> int:
    return struct.unpack_from(">Q", buf, off)[0] if off + 8 <= len(buf) else 0


def get_refcount(lay: Layout, buf: bytes | bytearray, cluster: int) -> int | None:
    loc = lay.refcount_location(cluster)
    if loc is None:
        return None
    off, shift, bits = loc
    if off + max(1, bits // 8) > len(buf):
        return None
    if bits < 8:
        return (buf[off] >> shift) & ((1 << bits) - 1)
    return int.from_bytes(buf[off : off + bits // 8], "big")


def set_refcount(lay: Layout, buf: bytearray, cluster: int, value: int) -> bool:
    loc = lay.refcount_location(cluster)
    if loc is None:
        return False
    off, shift, bits = loc
    value &= (1 << bits) - 1
    if off + max(1, bits // 8) > len(buf):
        return False
    if bits < 8:
        mask = ((1 << bits) - 1) << shift
        buf[off] = (buf[off] & ~mask & 0xFF) | (value << shift)
    else:
        buf[off : off + bits // 8] = value.to_bytes(bits // 8, "big")
    return True


def parse(buf: bytes) -> Layout:
    """Parse a valid v3 qcow2 image (a base image); raises on anything unexpected."""
    header = {name: struct.unpack_from(fmt, buf, off)[0] for name, off, fmt in HEADER_FIELDS}
    if header["magic"] != 0x514649FB or header["version"] != 3:
        raise ValueError("not a version 3 qcow2 image")
    cs = 1 << header["cluster_bits"]
    lay = Layout(
        size=len(buf),
        cluster_size=cs,
        header=header,
        extensions=[],
        ext_area_end=header["backing_file_offset"] or cs,
        bitmaps_ext=None,
        extended_l2=bool(header["incompatible_features"] & (1 << 4)),
    )
    roles = lay.roles

    def mark(offset: int, length: int, role: str) -> None:
        if length <= 0:
            return
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            roles.setdefault(c, set()).add(role)

    mark(0, cs, "header")
    pos = header["header_length"]
    while pos + 8 <= lay.ext_area_end:
        magic, length = struct.unpack_from(">II", buf, pos)
        if magic == 0:
            break
        ext = Extension(pos, magic, length)
        lay.extensions.append(ext)
        if magic == BITMAPS_EXT:
            lay.bitmaps_ext = ext
        pos += 8 + ((length + 7) & ~7)

    # refcount table and blocks
    rt_off, rt_clusters = header["refcount_table_offset"], header["refcount_table_clusters"]
    mark(rt_off, rt_clusters * cs, "reftable")
    for i in range(rt_clusters * cs // 8):
        word = _u64(buf, rt_off + 8 * i)
        block = word & ~0x1FF
        lay.refcount_blocks.append(block)
        if block:
            mark(block, cs, "refblock")
    while lay.refcount_blocks and not lay.refcount_blocks[-1]:
        lay.refcount_blocks.pop()

    # L1/L2 tables: the active one and every snapshot's
    l1s = [(header["l1_table_offset"], header["l1_size"], True)]
    snap_pos = header["snapshots_offset"]
    for i in range(header["nb_snapshots"]):
        fields = {n: struct.unpack_from(f, buf, snap_pos + o)[0] for n, o, f in SNAPSHOT_FIELDS}
        size = 40 + fields["extra_data_size"] + fields["id_str_size"] + fields["name_size"]
        size = (size + 7) & ~7
        lay.snapshots.append(
            Snapshot(i, snap_pos, fields["l1_table_offset"], fields["l1_size"], size)
        )
        l1s.append((fields["l1_table_offset"], fields["l1_size"], False))
        snap_pos += size
    if header["nb_snapshots"]:
        mark(header["snapshots_offset"], snap_pos - header["snapshots_offset"], "snaptable")
    lay.l1_tables = l1s
    esize = lay.l2_entry_size
    for l1_off, l1_size, active in l1s:
        mark(l1_off, 8 * l1_size, "l1" if active else "snapshot-l1")
        for i in range(l1_size):
            l2 = _u64(buf, l1_off + 8 * i) & OFFSET_MASK
            if not l2:
                continue
            lay.l2_tables[l2] = lay.l2_tables.get(l2, False) or active
    for l2 in sorted(lay.l2_tables):
        mark(l2, cs, "l2")
        for j in range(cs // esize):
            off = l2 + j * esize
            word = _u64(buf, off)
            if word == 0 and (not lay.extended_l2 or _u64(buf, off + 8) == 0):
                continue
            lay.l2_entries.append(L2Entry(off, word, l2, lay.l2_tables[l2]))
            if word & COMPRESSED:
                shift = 62 - (lay.cluster_bits - 8)
                coffset = word & ((1 << shift) - 1)
                nb_sectors = ((word >> shift) & ((1 << (lay.cluster_bits - 8)) - 1)) + 1
                start = coffset & ~511
                mark(start, nb_sectors * 512 - 0, "compressed")
            elif word & OFFSET_MASK:
                mark(word & OFFSET_MASK, cs, "data")

    # bitmaps
    if lay.bitmaps_ext is not None:
        d = lay.bitmaps_ext.offset + 8
        lay.nb_bitmaps, _reserved, lay.dir_size, lay.dir_offset = struct.unpack_from(
            ">IIQQ", buf, d
        )
        mark(lay.dir_offset, lay.dir_size, "bitmap-dir")
        pos = lay.dir_offset
        for i in range(lay.nb_bitmaps):
            tbl, tsize, flags, typ, gbits, nsize, xsize = struct.unpack_from(">QIIBBHI", buf, pos)
            extra = bytes(buf[pos + 24 : pos + 24 + xsize])
            name = bytes(buf[pos + 24 + xsize : pos + 24 + xsize + nsize])
            lay.entries.append(DirEntry(i, pos, tbl, tsize, flags, typ, gbits, name, extra))
            mark(tbl, 8 * tsize, "bitmap-table")
            for k in range(tsize):
                data = _u64(buf, tbl + 8 * k) & OFFSET_MASK
                if data:
                    mark(data, cs, "bitmap-data")
            pos += (24 + xsize + nsize + 7) & ~7
    for c in range((len(buf) + cs - 1) // cs):
        roles.setdefault(c, {"free"} if c else {"header"})
    return lay
