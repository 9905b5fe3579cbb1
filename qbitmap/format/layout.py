"""On-disk layout of every qcow2 structure qbitmap reads or rewrites: the one declaration.

Names follow QEMU's docs/interop/qcow2.rst ("Header", "Header extensions",
"Feature name table", "Bitmaps extension", "Bitmap directory", "Bitmap
table", "Snapshot table") and our own consistency-level extension
(man/qbitmap-levels.5).  Everything is big-endian.

Each structure is declared once, here: its schema (fields in file order, see
``schema.py``), the byte offset of every fixed field (``*_FIELD``, derived
from the schema, for in-place writes and for naming the field at fault), and
QEMU's bounds on it.  Nothing else in qbitmap writes a field offset or a
mask as a number.

This module describes bytes only.  Apart from the file magic nothing is
validated here: a repair tool must be able to *read* what it is about to
judge or fix, so every reserved field, padding byte and unknown trailing
byte is kept and written back verbatim (``build(parse(b)) == b``).  Large
tables (L1, L2, refcounts, bitmap tables) are decoded many entries at a
time in ``entries.py``; the masks below are their declaration.
"""

from __future__ import annotations

from qbitmap.format.schema import (
    FieldOffsets,
    Int,
    Length,
    Magic,
    Padding,
    Raw,
    Schema,
    Values,
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

# QEMU's bounds (block/qcow2.h, block/qcow2-bitmap.c).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOTS_SIZE = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
#: A version 3 snapshot entry's extra data holds at least the 64-bit VM state size and the
#: virtual disk size; QEMU calls a shorter entry incomplete (a corruption to qemu-img check).
SNAPSHOT_EXTRA_DATA_V3_MIN = 16
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC  # only in_use and auto: QEMU refuses the rest
BT_DIRTY_TRACKING_BITMAP = 1


def _pad8(size: int) -> int:
    """Bytes of zero padding that bring *size* to a multiple of 8."""
    return -size % 8


def _v3(v: Values) -> bool:
    return bool(v["version"] >= 3)


# "Header": 72 bytes in v2; 104 bytes plus optional additional fields in v3.
# For v2 the v3 fields are absent (None).  Additional fields beyond
# compression_type and its padding are kept as raw bytes ("unknown header
# fields must be preserved").
Header = Schema(
    Magic("magic", MAGIC),
    Int("version", "I"),
    Int("backing_file_offset", "Q"),
    Int("backing_file_size", "I"),
    Int("cluster_bits", "I"),
    Int("size", "Q"),
    Int("crypt_method", "I"),
    Int("l1_size", "I"),
    Int("l1_table_offset", "Q"),
    Int("refcount_table_offset", "Q"),
    Int("refcount_table_clusters", "I"),
    Int("nb_snapshots", "I"),
    Int("snapshots_offset", "Q"),
    Int("incompatible_features", "Q", when=_v3),
    Int("compatible_features", "Q", when=_v3),
    Int("autoclear_features", "Q", when=_v3),
    Int("refcount_order", "I", when=_v3),
    Int("header_length", "I", when=_v3),
    # Additional field at byte 104, present when header_length > 104.
    Int("compression_type", "B", when=lambda v: _v3(v) and v["header_length"] > 104),
    Raw(
        "padding",
        lambda v: min(v["header_length"], QEMU_HEADER_LENGTH) - 105,
        when=lambda v: _v3(v) and v["header_length"] > 105,
    ),
    Raw(
        "unknown_fields",
        lambda v: v["header_length"] - QEMU_HEADER_LENGTH,
        when=lambda v: _v3(v) and v["header_length"] > QEMU_HEADER_LENGTH,
    ),
)

HEADER_FIELD = FieldOffsets(Header, version=3, header_length=QEMU_HEADER_LENGTH)

# Where the refcount table is: the two header fields QEMU rewrites together, in one
# 12-byte write, when it moves the table (qcow2_refcount_area).
RefcountTableLocation = Schema(
    Int("refcount_table_offset", "Q"),
    Int("refcount_table_clusters", "I"),
)

# The 8 bytes in front of every header extension's data.
ExtensionHeader = Schema(
    Int("magic", "I"),
    Int("length", "I"),
)
EXTENSION_FIELD = FieldOffsets(ExtensionHeader)
EXTENSION_HEADER_SIZE = ExtensionHeader.sizeof()

# One header extension with its padding kept raw (the spec allows non-zero
# padding after string extensions).  `length` excludes the padding.
HeaderExtension = Schema(
    Int("magic", "I"),
    Length("length", "I", of="data"),
    Raw("data", lambda v: v["length"]),
    Padding("padding", lambda v: _pad8(v["length"])),
)

# "Feature name table": 48-byte entries.
FEATURE_INCOMPATIBLE, FEATURE_COMPATIBLE, FEATURE_AUTOCLEAR = 0, 1, 2
FeatureNameEntry = Schema(
    Int("type", "B"),
    Int("bit", "B"),
    Raw("name", 46),
)
FEATURE_NAME_ENTRY_SIZE = FeatureNameEntry.sizeof()

# "Bitmaps extension": 24 bytes of data.
BitmapsExtension = Schema(
    Int("nb_bitmaps", "I"),
    Int("reserved32", "I"),
    Int("bitmap_directory_size", "Q"),
    Int("bitmap_directory_offset", "Q"),
)
BITMAPS_EXTENSION_FIELD = FieldOffsets(BitmapsExtension)
BITMAPS_EXTENSION_SIZE = BitmapsExtension.sizeof()

# "Full disk encryption header pointer": 16 bytes of data.
CryptoHeaderPointer = Schema(
    Int("offset", "Q"),
    Int("length", "Q"),
)
CRYPTO_HEADER_POINTER_SIZE = CryptoHeaderPointer.sizeof()

# "Bitmap directory" entry.  Name and extra data are raw bytes: a damaged
# name must survive a rewrite byte for byte.
_BITMAP_DIR_ENTRY_FIXED = (
    Int("bitmap_table_offset", "Q"),
    Int("bitmap_table_size", "I"),
    Int("flags", "I"),
    Int("type", "B"),
    Int("granularity_bits", "B"),
    Length("name_size", "H", of="name"),
    Length("extra_data_size", "I", of="extra_data"),
)
# The fixed part alone: what sizes the rest of the entry.
BitmapDirectoryEntryFixed = Schema(*_BITMAP_DIR_ENTRY_FIXED)
BITMAP_DIR_ENTRY_FIXED_SIZE = BitmapDirectoryEntryFixed.sizeof()
BitmapDirectoryEntry = Schema(
    *_BITMAP_DIR_ENTRY_FIXED,
    Raw("extra_data", lambda v: v["extra_data_size"]),
    Raw("name", lambda v: v["name_size"]),
    Padding(
        "padding",
        lambda v: _pad8(BITMAP_DIR_ENTRY_FIXED_SIZE + v["extra_data_size"] + v["name_size"]),
    ),
)
BITMAP_DIR_ENTRY_FIELD = FieldOffsets(BitmapDirectoryEntry)


def dir_entry_size(name_size: int, extra_data_size: int) -> int:
    """Bytes one directory entry occupies, padding included (QEMU's calc_dir_entry_size)."""
    return (BITMAP_DIR_ENTRY_FIXED_SIZE + name_size + extra_data_size + 7) & ~7


# "Bitmap table" entry: bits 9-55 hold the host offset, bit 0 means "all ones"
# when the offset is 0, the rest is reserved (bulk tables are decoded in entries.py).
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
_SNAPSHOT_ENTRY_FIXED = (
    Int("l1_table_offset", "Q"),
    Int("l1_size", "I"),
    Length("id_str_size", "H", of="id_str"),
    Length("name_size", "H", of="name"),
    Int("date_sec", "I"),
    Int("date_nsec", "I"),
    Int("vm_clock_nsec", "Q"),
    Int("vm_state_size", "I"),
    Length("extra_data_size", "I", of="extra_data"),
)
SnapshotEntryFixed = Schema(*_SNAPSHOT_ENTRY_FIXED)
SNAPSHOT_ENTRY_FIXED_SIZE = SnapshotEntryFixed.sizeof()
SnapshotEntry = Schema(
    *_SNAPSHOT_ENTRY_FIXED,
    Raw("extra_data", lambda v: v["extra_data_size"]),
    Raw("id_str", lambda v: v["id_str_size"]),
    Raw("name", lambda v: v["name_size"]),
    Padding(
        "padding",
        lambda v: _pad8(
            SNAPSHOT_ENTRY_FIXED_SIZE + v["extra_data_size"] + v["id_str_size"] + v["name_size"]
        ),
    ),
)
SNAPSHOT_FIELD = FieldOffsets(SnapshotEntry)


def snapshot_entry_size(extra_data_size: int, id_str_size: int, name_size: int) -> int:
    """Bytes one snapshot table entry occupies, padding included."""
    return (SNAPSHOT_ENTRY_FIXED_SIZE + extra_data_size + id_str_size + name_size + 7) & ~7


# qbitmap consistency-level extension (man/qbitmap-levels.5, "ON-DISK FORMAT").
# Records are 8-byte aligned; consistent_level sits at a naturally aligned offset (8)
# so a writer can update it with one 4-byte write.
LEVELS_VERSION = 1
LEVELS_AUTOCLEAR_BIT = 63
_LEVEL_RECORD_FIXED = (
    Int("bitmap_table_offset", "Q"),
    Int("consistent_level", "i"),
    Int("level_bits", "B"),
    Int("max_level", "B"),
    Int("granularity_bits", "B"),
    Int("reserved", "B", default=0),
    Length("name_size", "H", of="name"),
    Int("reserved2", "H", default=0),
)
LevelRecordFixed = Schema(*_LEVEL_RECORD_FIXED)
LEVEL_RECORD_FIXED_SIZE = LevelRecordFixed.sizeof()
LevelRecord = Schema(
    *_LEVEL_RECORD_FIXED,
    Raw("name", lambda v: v["name_size"]),
    Padding("padding", lambda v: _pad8(LEVEL_RECORD_FIXED_SIZE + v["name_size"])),
)
LEVEL_RECORD_FIELD = FieldOffsets(LevelRecord)


def level_record_size(name_size: int) -> int:
    """Bytes one consistency-level record occupies, padding included."""
    return (LEVEL_RECORD_FIXED_SIZE + name_size + 7) & ~7


LevelsExtensionHeader = Schema(
    Int("version", "I"),
    Int("nb_records", "I"),
)
LEVELS_EXTENSION_HEADER_SIZE = LevelsExtensionHeader.sizeof()
