"""On-disk layout of every qcow2 structure qbitmap reads or rewrites: the one declaration.

Names follow QEMU's docs/interop/qcow2.rst ("Header", "Header extensions",
"Feature name table", "Bitmaps extension", "Bitmap directory", "Bitmap
table", "Snapshot table") and our own consistency-level extension
(man/qbitmap-levels.5).  Everything is big-endian.

Each structure is declared once, here: its construct schema, the byte offset
of every fixed field (``*_FIELD``, derived from the schema, for in-place
writes and for naming the field at fault), and QEMU's bounds on it.  Nothing
else in qbitmap writes a field offset or a mask as a number.

This module describes bytes only.  Apart from the file magic nothing is
validated here: a repair tool must be able to *read* what it is about to
judge or fix, so every reserved field, padding byte and unknown trailing
byte is kept and written back verbatim (``build(parse(b)) == b``).  Large
tables (L1, L2, refcounts, bitmap tables) are decoded many entries at a
time with numpy in ``entries.py``; the masks below are their declaration.

Schemas are never ``.compile()``d: compiled parsers skip checks.
"""

from __future__ import annotations

import struct

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
    SizeofError,
    Struct,
    this,
)


class FieldOffsets:
    """Byte offsets of a structure's fixed fields, by name: ``HEADER_FIELD.l1_size == 36``.

    Derived from the schema: each field starts where the one before ends.
    *assume* gives the context fields that conditional sizes depend on (the
    header's are those of a v3 header as QEMU writes it).
    """

    def __init__(self, schema: Struct, **assume: int) -> None:
        offsets: dict[str, int] = {}
        fields: dict[str, object] = {}
        pos = 0
        for sub in schema.subcons:
            offsets[sub.name] = pos
            fields[sub.name] = sub
            try:
                pos += sub.sizeof(**assume)
            except (SizeofError, AttributeError, KeyError):
                break  # a field of variable size: the ones after it have no fixed offset
        self._offsets = offsets
        self._fields = fields

    def build(self, name: str, value: int) -> bytes:
        """The bytes of field *name* holding *value* (for an in-place write of that field)."""
        return bytes(self._fields[name].build(value))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> int:
        try:
            return self._offsets[name]
        except KeyError:
            raise AttributeError(f"no fixed field {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._offsets


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
    "padding"
    / If(
        lambda c: _v3(c) and c.header_length > 105,
        Bytes(lambda c: min(c.header_length, QEMU_HEADER_LENGTH) - 105),
    ),
    "unknown_fields"
    / If(
        lambda c: _v3(c) and c.header_length > QEMU_HEADER_LENGTH,
        Bytes(lambda c: c.header_length - QEMU_HEADER_LENGTH),
    ),
)

HEADER_FIELD = FieldOffsets(Header, version=3, header_length=QEMU_HEADER_LENGTH)

# Where the refcount table is: the two header fields QEMU rewrites together, in one
# 12-byte write, when it moves the table (qcow2_refcount_area).
RefcountTableLocation = Struct(
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
)

# The 8 bytes in front of every header extension's data.
ExtensionHeader = Struct(
    "magic" / Int32ub,
    "length" / Int32ub,
)
EXTENSION_FIELD = FieldOffsets(ExtensionHeader)
EXTENSION_HEADER_SIZE = ExtensionHeader.sizeof()

# One header extension with its padding kept raw (the spec allows non-zero
# padding after string extensions).  `length` excludes the padding.
class FixedFields:
    """A schema's leading fixed-size integer fields as one :class:`struct.Struct`, derived from it.

    For structures read by the hundred on a hot path (bitmap directory
    entries): unpacking big-endian integers with ``struct`` yields what the
    schema's ``parse`` yields -- it checks nothing more for them -- at a
    small fraction of the cost.  The fields stop at the first one that is
    not a plain integer.
    """

    def __init__(self, schema: Struct) -> None:
        fmt = ">"
        names: list[str] = []
        for sub in schema.subcons:
            inner = sub
            while not hasattr(inner, "fmtstr") and hasattr(inner, "subcon"):
                inner = inner.subcon
            code = getattr(inner, "fmtstr", "")
            if not code.startswith(">"):
                break
            fmt += code[1:]
            names.append(sub.name)
        self.struct = struct.Struct(fmt)
        self.names = tuple(names)
        self.size = self.struct.size

    def unpack_from(self, data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, ...]:
        """The fields' values, in schema order."""
        return self.struct.unpack_from(data, offset)


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
FEATURE_NAME_ENTRY_SIZE = FeatureNameEntry.sizeof()

# "Bitmaps extension": 24 bytes of data.
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
BITMAPS_EXTENSION_FIELD = FieldOffsets(BitmapsExtension)
BITMAPS_EXTENSION_SIZE = BitmapsExtension.sizeof()

# "Full disk encryption header pointer": 16 bytes of data.
CryptoHeaderPointer = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)
CRYPTO_HEADER_POINTER_SIZE = CryptoHeaderPointer.sizeof()

# "Bitmap directory" entry.  Name and extra data are raw bytes: a damaged
# name must survive a rewrite byte for byte.
_BITMAP_DIR_ENTRY_FIXED = (
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "extra_data_size" / Rebuild(Int32ub, lambda c: len(c.extra_data)),
)
# The fixed part alone: what sizes the rest of the entry.
BitmapDirectoryEntryFixed = Struct(*_BITMAP_DIR_ENTRY_FIXED)
BitmapDirectoryEntry = Struct(
    *_BITMAP_DIR_ENTRY_FIXED,
    "extra_data" / Bytes(this.extra_data_size),
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(lambda c: _pad8(BITMAP_DIR_ENTRY_FIXED_SIZE + c.extra_data_size + c.name_size)),
        lambda c: bytes(_pad8(BITMAP_DIR_ENTRY_FIXED_SIZE + c.extra_data_size + c.name_size)),
    ),
)
BITMAP_DIR_ENTRY_FIELD = FieldOffsets(BitmapDirectoryEntry)
BITMAP_DIR_ENTRY_FIXED_SIZE = BitmapDirectoryEntryFixed.sizeof()
BITMAP_DIR_ENTRY_FIXED = FixedFields(BitmapDirectoryEntryFixed)


def dir_entry_size(name_size: int, extra_data_size: int) -> int:
    """Bytes one directory entry occupies, padding included (QEMU's calc_dir_entry_size)."""
    return (BITMAP_DIR_ENTRY_FIXED_SIZE + name_size + extra_data_size + 7) & ~7


# "Bitmap table" entry (bulk tables are decoded with numpy, see entries.py).
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
_SNAPSHOT_ENTRY_FIXED = (
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Rebuild(Int16ub, lambda c: len(c.id_str)),
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Rebuild(Int32ub, lambda c: len(c.extra_data)),
)
SnapshotEntryFixed = Struct(*_SNAPSHOT_ENTRY_FIXED)
SnapshotEntry = Struct(
    *_SNAPSHOT_ENTRY_FIXED,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(
            lambda c: _pad8(
                SNAPSHOT_ENTRY_FIXED_SIZE + c.extra_data_size + c.id_str_size + c.name_size
            )
        ),
        lambda c: bytes(
            _pad8(SNAPSHOT_ENTRY_FIXED_SIZE + c.extra_data_size + c.id_str_size + c.name_size)
        ),
    ),
)
SNAPSHOT_FIELD = FieldOffsets(SnapshotEntry)
SNAPSHOT_ENTRY_FIXED_SIZE = SnapshotEntryFixed.sizeof()


def snapshot_entry_size(extra_data_size: int, id_str_size: int, name_size: int) -> int:
    """Bytes one snapshot table entry occupies, padding included."""
    return (SNAPSHOT_ENTRY_FIXED_SIZE + extra_data_size + id_str_size + name_size + 7) & ~7


# qbitmap consistency-level extension (man/qbitmap-levels.5, "ON-DISK FORMAT").
# Records are 8-byte aligned; consistent_level sits at a naturally aligned offset (8)
# so a writer can update it with one 4-byte write.
LEVELS_VERSION = 1
LEVELS_AUTOCLEAR_BIT = 63
_LEVEL_RECORD_FIXED = (
    "bitmap_table_offset" / Int64ub,
    "consistent_level" / Int32sb,
    "level_bits" / Int8ub,
    "max_level" / Int8ub,
    "granularity_bits" / Int8ub,
    "reserved" / Default(Int8ub, 0),
    "name_size" / Rebuild(Int16ub, lambda c: len(c.name)),
    "reserved2" / Default(Int16ub, 0),
)
LevelRecordFixed = Struct(*_LEVEL_RECORD_FIXED)
LevelRecord = Struct(
    *_LEVEL_RECORD_FIXED,
    "name" / Bytes(this.name_size),
    "padding"
    / Default(
        Bytes(lambda c: _pad8(LEVEL_RECORD_FIXED_SIZE + c.name_size)),
        lambda c: bytes(_pad8(LEVEL_RECORD_FIXED_SIZE + c.name_size)),
    ),
)
LEVEL_RECORD_FIELD = FieldOffsets(LevelRecord)
LEVEL_RECORD_FIXED_SIZE = LevelRecordFixed.sizeof()


def level_record_size(name_size: int) -> int:
    """Bytes one consistency-level record occupies, padding included."""
    return (LEVEL_RECORD_FIXED_SIZE + name_size + 7) & ~7


LevelsExtensionHeader = Struct(
    "version" / Int32ub,
    "nb_records" / Int32ub,
)
LEVELS_EXTENSION_HEADER_SIZE = LevelsExtensionHeader.sizeof()
