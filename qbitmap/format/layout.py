"""On-disk layout of every qcow2 structure qbitmap reads or rewrites.

Names follow QEMU's docs/interop/qcow2.rst ("Header", "Header extensions",
"Feature name table", "Bitmaps extension", "Bitmap directory", "Bitmap
table", "Snapshot table") and our own consistency-level extension
(shared/spec/consistency-levels.md).  Everything is big-endian.

This module describes bytes only.  Apart from the file magic nothing is
validated here: a repair tool must be able to *read* what it is about to
judge or fix, so every reserved field, padding byte and unknown trailing
byte is kept and written back verbatim (``build(parse(b)) == b``).  Large
tables (L1, L2, refcounts, bitmap tables) are not parsed with construct but
with numpy in ``tables.py``; the single-entry schemas below document them.

Schemas are never ``.compile()``d: compiled parsers skip checks.
"""

from __future__ import annotations

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Default,
    Flag,
    If,
    Int8ub,
    Int16ub,
    Int32sb,
    Int32ub,
    Int64ub,
    Rebuild,
    Struct,
    this,
)

MAGIC = b"QFI\xfb"

# Header extension types ("Header extensions").
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_LEVELS = 0x71626C76  # qbitmap consistency levels ("qblv")

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
QEMU_HEADER_LENGTH = 112


def _pad8(size: int) -> int:
    """Bytes of zero padding that bring *size* to a multiple of 8."""
    return -size % 8


def _v3(ctx: object) -> bool:
    return bool(ctx.version >= 3)  # type: ignore[attr-defined]


# "Header": 72 bytes in v2; 104 bytes plus optional additional fields in v3.
# For v2 the v3 fields are absent (None).  Additional fields beyond
# compression_type and its padding are kept as raw bytes ("unknown header
# fields must be preserved").
Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "incompatible_features" / If(_v3, Int64ub),
    "compatible_features" / If(_v3, Int64ub),
    "autoclear_features" / If(_v3, Int64ub),
    "refcount_order" / If(_v3, Int32ub),
    "header_length" / If(_v3, Int32ub),
    # Additional field at byte 104, present when header_length > 104.
    "compression_type" / If(lambda c: _v3(c) and c.header_length > 104, Int8ub),
    "padding" / If(
        lambda c: _v3(c) and c.header_length > 105,
        Bytes(lambda c: min(c.header_length, QEMU_HEADER_LENGTH) - 105),
    ),
    "unknown_fields" / If(
        lambda c: _v3(c) and c.header_length > QEMU_HEADER_LENGTH,
        Bytes(lambda c: c.header_length - QEMU_HEADER_LENGTH),
    ),
)

# One header extension with its padding kept raw (the spec allows non-zero
# padding after string extensions).  `length` excludes the padding.
HeaderExtension = Struct(
    "magic" / Int32ub,
    "length" / Rebuild(Int32ub, lambda c: len(c.data)),
    "data" / Bytes(this.length),
    "padding" / Default(Bytes(lambda c: _pad8(c.length)), lambda c: bytes(_pad8(c.length))),
)

# "Feature name table": 48-byte entries.
FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2
FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / Bytes(46),
)

# "Bitmaps extension": 24 bytes of data.
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

# "Full disk encryption header pointer": 16 bytes of data.
CryptoHeaderPointer = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

# "Bitmap directory" entry.  Name and extra data are raw bytes: a damaged
# name must survive a rewrite byte for byte.
BITMAP_DIR_ENTRY_FIXED_SIZE = 24
BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "extra_data_size" / Rebuild(Int32ub, lambda c: len(c.extra_data)),
    "extra_data" / Bytes(this.extra_data_size),
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(lambda c: _pad8(24 + c.extra_data_size + c.name_size)),
        lambda c: bytes(_pad8(24 + c.extra_data_size + c.name_size)),
    ),
)


def dir_entry_size(name_size: int, extra_data_size: int) -> int:
    """Bytes one directory entry occupies, padding included (QEMU's calc_dir_entry_size)."""
    return (24 + name_size + extra_data_size + 7) & ~7


# "Bitmap table" entry (bulk tables are decoded with numpy, see tables.py).
# BitStruct fields run from the most significant bit down.
BitmapTableEntry = BitStruct(
    "reserved_high" / BitsInteger(8),  # bits 56-63
    "cluster_offset_bits" / BitsInteger(47),  # bits 9-55: host offset >> 9
    "reserved_low" / BitsInteger(8),  # bits 1-8
    "all_ones" / Flag,  # bit 0, meaningful only when the offset is 0
)
BITMAP_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BITMAP_TABLE_RESERVED_MASK = 0xFF000000000001FE
BITMAP_TABLE_ALL_ONES = 1

# Refcount table, L1 and L2 entry masks ("Host cluster management",
# "Cluster mapping").
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

# "Snapshot table" entry header; the variable part follows.
SnapshotEntry = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Rebuild(Int16ub, lambda c: len(c.id_str)),
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Rebuild(Int32ub, lambda c: len(c.extra_data)),
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(lambda c: _pad8(40 + c.extra_data_size + c.id_str_size + c.name_size)),
        lambda c: bytes(_pad8(40 + c.extra_data_size + c.id_str_size + c.name_size)),
    ),
)

# qbitmap consistency-level extension (shared/spec/consistency-levels.md,
# "On-disk format").  Records are 8-byte aligned; consistent_level sits at a
# naturally aligned offset (8) so a writer can update it with one 4-byte write.
LEVELS_VERSION = 1
LEVELS_AUTOCLEAR_BIT = 63
LEVEL_RECORD_FIXED_SIZE = 20
LEVEL_RECORD_CONSISTENT_LEVEL_OFFSET = 8
LevelRecord = Struct(
    "bitmap_table_offset" / Int64ub,
    "consistent_level" / Int32sb,
    "level_bits" / Int8ub,
    "max_level" / Int8ub,
    "granularity_bits" / Int8ub,
    "reserved" / Default(Int8ub, 0),
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "reserved2" / Default(Int16ub, 0),
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(lambda c: _pad8(LEVEL_RECORD_FIXED_SIZE + c.name_size)),
        lambda c: bytes(_pad8(LEVEL_RECORD_FIXED_SIZE + c.name_size)),
    ),
)
LevelsExtensionHeader = Struct(
    "version" / Int32ub,
    "nb_records" / Int32ub,
)
