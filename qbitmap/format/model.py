"""Typed views of the parsed structures, each with the file offset it lives at.

The schemas in ``layout.py`` and these dataclasses use the same field names
(the qcow2 spec's), so ``from_container``/``to_container`` are mechanical.  Flag words become ``enum.IntFlag`` values, which keep unknown
bits on Python >= 3.11 (``boundary=KEEP``).  Raw bytes (names, extra data,
padding) are kept for anything that may be written back.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qbitmap.format import layout

if TYPE_CHECKING:
    import numpy as np


class IncompatibleFeature(enum.IntFlag):
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    EXTERNAL_DATA_FILE = 1 << 2
    COMPRESSION_TYPE = 1 << 3
    EXTENDED_L2 = 1 << 4


class CompatibleFeature(enum.IntFlag):
    LAZY_REFCOUNTS = 1 << 0


class AutoclearFeature(enum.IntFlag):
    BITMAPS = 1 << 0
    RAW_EXTERNAL_DATA = 1 << 1
    QBITMAP_LEVELS = 1 << layout.LEVELS_AUTOCLEAR_BIT


class BitmapFlag(enum.IntFlag):
    IN_USE = 1 << 0
    AUTO = 1 << 1
    EXTRA_DATA_COMPATIBLE = 1 << 2


_IN_USE = int(BitmapFlag.IN_USE)
_AUTO = int(BitmapFlag.AUTO)


# Names QEMU writes into its feature name table, used when an image has none.
DEFAULT_FEATURE_NAMES: dict[tuple[int, int], str] = {
    (layout.FEATURE_INCOMPATIBLE, 0): "dirty bit",
    (layout.FEATURE_INCOMPATIBLE, 1): "corrupt bit",
    (layout.FEATURE_INCOMPATIBLE, 2): "external data file",
    (layout.FEATURE_INCOMPATIBLE, 3): "compression type",
    (layout.FEATURE_INCOMPATIBLE, 4): "extended L2 entries",
    (layout.FEATURE_COMPATIBLE, 0): "lazy refcounts",
    (layout.FEATURE_AUTOCLEAR, 0): "bitmaps",
    (layout.FEATURE_AUTOCLEAR, 1): "raw external data",
    (layout.FEATURE_AUTOCLEAR, 63): "qbitmap consistency levels",
}

EXTENSION_NAMES: dict[int, str] = {
    layout.EXT_BACKING_FORMAT: "backing file format",
    layout.EXT_FEATURE_NAMES: "feature name table",
    layout.EXT_BITMAPS: "bitmaps",
    layout.EXT_CRYPTO: "full disk encryption header pointer",
    layout.EXT_DATA_FILE: "external data file",
    layout.EXT_LEVELS: "qbitmap consistency levels",
}

COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

#: The header's fields in file order: the schema's (layout.Header) names.
HEADER_FIELDS: tuple[str, ...] = layout.Header.names


@dataclass(frozen=True, slots=True)
class Header:
    """The qcow2 header ("Header"); v3-only fields are None for v2 images."""

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int | None = None
    compatible_features: int | None = None
    autoclear_features: int | None = None
    refcount_order: int | None = None
    header_length: int | None = None
    compression_type: int | None = None
    padding: bytes | None = None
    unknown_fields: bytes | None = None

    @classmethod
    def from_container(cls, c: Any) -> Header:
        return cls(**{name: c[name] for name in HEADER_FIELDS})

    def to_container(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in HEADER_FIELDS}

    def build(self) -> bytes:
        return bytes(layout.Header.build(self.to_container()))

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def virtual_size(self) -> int:
        """Guest disk size in bytes as QEMU sees it (rounded down to 512)."""
        return self.size & ~511

    @property
    def effective_header_length(self) -> int:
        return layout.V2_HEADER_LENGTH if self.version < 3 else int(self.header_length or 0)

    @property
    def effective_refcount_order(self) -> int:
        return 4 if self.refcount_order is None else self.refcount_order

    @property
    def incompatible(self) -> IncompatibleFeature:
        return IncompatibleFeature(self.incompatible_features or 0)

    @property
    def compatible(self) -> CompatibleFeature:
        return CompatibleFeature(self.compatible_features or 0)

    @property
    def autoclear(self) -> AutoclearFeature:
        return AutoclearFeature(self.autoclear_features or 0)

    @property
    def compression_name(self) -> str:
        code = self.compression_type or 0
        return COMPRESSION_TYPES.get(code, f"unknown ({code})")


@dataclass(frozen=True, slots=True)
class Extension:
    """One header extension, with its raw data and padding."""

    offset: int  # file offset of the 8-byte extension header
    magic: int
    data: bytes
    padding: bytes

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def data_offset(self) -> int:
        return self.offset + layout.EXTENSION_HEADER_SIZE

    def field_offset(self, name: str) -> int:
        """File offset of the extension header's field *name* ("magic", "length")."""
        return self.offset + getattr(layout.EXTENSION_FIELD, name)

    @property
    def total_size(self) -> int:
        return 8 + len(self.data) + len(self.padding)

    @property
    def name(self) -> str:
        return EXTENSION_NAMES.get(self.magic, "unknown")

    def build(self) -> bytes:
        return bytes(
            layout.HeaderExtension.build(
                {"magic": self.magic, "data": self.data, "padding": self.padding}
            )
        )


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """Data of the bitmaps header extension."""

    offset: int  # file offset of the extension's data
    nb_bitmaps: int
    reserved32: int
    bitmap_directory_size: int
    bitmap_directory_offset: int

    @classmethod
    def decode(cls, data: bytes, *, offset: int) -> BitmapsExtension:
        """The extension's data bytes, found at file offset *offset*.

        The caller has checked that *data* is ``layout.BITMAPS_EXTENSION_SIZE``
        bytes: what a wrong length means (QEMU ignores the extension, or the
        image is corrupt) depends on who asks.
        """
        return cls.from_container(layout.BitmapsExtension.parse(data), offset=offset)

    @classmethod
    def from_container(cls, c: Any, *, offset: int) -> BitmapsExtension:
        return cls(
            offset=offset,
            nb_bitmaps=c.nb_bitmaps,
            reserved32=c.reserved32,
            bitmap_directory_size=c.bitmap_directory_size,
            bitmap_directory_offset=c.bitmap_directory_offset,
        )

    def to_container(self) -> dict[str, int]:
        return {
            "nb_bitmaps": self.nb_bitmaps,
            "reserved32": self.reserved32,
            "bitmap_directory_size": self.bitmap_directory_size,
            "bitmap_directory_offset": self.bitmap_directory_offset,
        }

    def build(self) -> bytes:
        return bytes(layout.BitmapsExtension.build(self.to_container()))

    def field_offset(self, name: str) -> int:
        """File offset of the field *name* of this extension's data."""
        return self.offset + getattr(layout.BITMAPS_EXTENSION_FIELD, name)


@dataclass(frozen=True, slots=True)
class FeatureName:
    """One entry of the feature name table."""

    type: int  # 0 incompatible, 1 compatible, 2 autoclear (other values kept as read)
    bit: int
    name: bytes  # up to the first NUL


def feature_name_entries(data: bytes) -> tuple[list[FeatureName], bytes]:
    """The feature name table's whole entries, and the bytes after the last of them."""
    size = layout.FEATURE_NAME_ENTRY_SIZE
    whole = len(data) - len(data) % size
    entries = []
    for pos in range(0, whole, size):
        c = layout.FeatureNameEntry.parse(data, pos)
        entries.append(FeatureName(type=c.type, bit=c.bit, name=c.name.split(b"\0", 1)[0]))
    return entries, bytes(data[whole:])


def crypto_header_pointer(data: bytes) -> tuple[int, int]:
    """``(offset, length)`` of the LUKS header, from the pointer extension's 16 data bytes."""
    c = layout.CryptoHeaderPointer.parse(data)
    return c.offset, c.length


@dataclass(frozen=True, slots=True)
class BitmapEntry:
    """One bitmap directory entry."""

    offset: int  # file offset of the entry
    index: int  # position in the directory
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: BitmapFlag
    type: int
    granularity_bits: int
    extra_data: bytes
    name: bytes
    padding: bytes = field(default=b"")

    @classmethod
    def from_container(cls, c: Any, *, offset: int, index: int) -> BitmapEntry:
        # Item access, not attributes: a directory may hold thousands of entries, and
        # a parsed structure's attribute look-up first fails as an attribute.
        return cls(
            offset=offset,
            index=index,
            bitmap_table_offset=c["bitmap_table_offset"],
            bitmap_table_size=c["bitmap_table_size"],
            flags=BitmapFlag(c["flags"]),
            type=c["type"],
            granularity_bits=c["granularity_bits"],
            extra_data=c["extra_data"],
            name=c["name"],
            padding=c["padding"],
        )

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview, *, offset: int, index: int) -> BitmapEntry:
        """The entry whose bytes, padding included, are *raw* (a whole entry, nothing more)."""
        c = layout.BitmapDirectoryEntry.parse(raw)
        if len(raw) != layout.dir_entry_size(c["name_size"], c["extra_data_size"]):
            raise ValueError(f"a directory entry of {len(raw)} bytes, its fields say otherwise")
        return cls.from_container(c, offset=offset, index=index)

    @classmethod
    def new(
        cls,
        name: bytes,
        *,
        granularity_bits: int,
        bitmap_table_offset: int,
        bitmap_table_size: int,
        flags: BitmapFlag,
    ) -> BitmapEntry:
        """A fresh dirty-tracking entry without extra data (offset and index 0 until placed)."""
        pad = layout.dir_entry_size(len(name), 0) - (layout.BITMAP_DIR_ENTRY_FIXED_SIZE + len(name))
        return cls(
            offset=0,
            index=0,
            bitmap_table_offset=bitmap_table_offset,
            bitmap_table_size=bitmap_table_size,
            flags=flags,
            type=layout.BT_DIRTY_TRACKING_BITMAP,
            granularity_bits=granularity_bits,
            extra_data=b"",
            name=name,
            padding=bytes(pad),
        )

    def to_container(self) -> dict[str, Any]:
        return {
            "bitmap_table_offset": self.bitmap_table_offset,
            "bitmap_table_size": self.bitmap_table_size,
            "flags": int(self.flags),
            "type": self.type,
            "granularity_bits": self.granularity_bits,
            "extra_data": self.extra_data,
            "name": self.name,
            "padding": self.padding,
        }

    def build(self) -> bytes:
        return bytes(layout.BitmapDirectoryEntry.build(self.to_container()))

    @property
    def size(self) -> int:
        return (
            layout.BITMAP_DIR_ENTRY_FIXED_SIZE
            + len(self.extra_data)
            + len(self.name)
            + len(self.padding)
        )

    def field_offset(self, name: str) -> int:
        """File offset of the entry's fixed field *name* ("flags", "bitmap_table_size", ...)."""
        return self.offset + getattr(layout.BITMAP_DIR_ENTRY_FIELD, name)

    @property
    def name_offset(self) -> int:
        """File offset of the name's first byte."""
        return self.offset + layout.BITMAP_DIR_ENTRY_FIXED_SIZE + len(self.extra_data)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def granularity_valid(self) -> bool:
        """granularity_bits within QEMU's range (9..31): bits and bytes can be computed."""
        return (
            layout.BME_MIN_GRANULARITY_BITS
            <= self.granularity_bits
            <= layout.BME_MAX_GRANULARITY_BITS
        )

    @property
    def in_use(self) -> bool:
        # As plain integers: IntFlag's own '&' builds a flag object, and check asks often.
        return bool(int(self.flags) & _IN_USE)

    @property
    def auto(self) -> bool:
        return bool(int(self.flags) & _AUTO)

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", errors="backslashreplace")

    @property
    def qemu_name(self) -> bytes:
        """The name as QEMU knows it: a C string, the bytes before the first NUL."""
        return self.name.split(b"\0", 1)[0]

    def renamed(self, name: bytes) -> BitmapEntry:
        """This entry with another name (and the padding that name needs)."""
        pad = layout.dir_entry_size(len(name), len(self.extra_data)) - (
            layout.BITMAP_DIR_ENTRY_FIXED_SIZE + len(self.extra_data) + len(name)
        )
        return dataclasses.replace(self, name=name, padding=bytes(pad))

    def named(self, name: str) -> bool:
        """Whether *name* (as typed on a command line) is what QEMU calls this bitmap."""
        return self.qemu_name == name.encode("utf-8", "surrogateescape")

    @property
    def flag_words(self) -> list[str]:
        """Flag names as ``qemu-img info --output=json`` spells them."""
        words = []
        if self.flags & BitmapFlag.IN_USE:
            words.append("in-use")
        if self.flags & BitmapFlag.AUTO:
            words.append("auto")
        return words


@dataclass(frozen=True, slots=True)
class LevelRecord:
    """One record of the qbitmap consistency-level extension."""

    offset: int  # file offset of the record
    bitmap_table_offset: int
    consistent_level: int
    level_bits: int
    max_level: int
    granularity_bits: int
    name: bytes
    reserved: int = 0
    reserved2: int = 0
    padding: bytes = b""

    @classmethod
    def from_container(cls, c: Any, *, offset: int) -> LevelRecord:
        return cls(
            offset=offset,
            bitmap_table_offset=c.bitmap_table_offset,
            consistent_level=c.consistent_level,
            level_bits=c.level_bits,
            max_level=c.max_level,
            granularity_bits=c.granularity_bits,
            name=c.name,
            reserved=c.reserved,
            reserved2=c.reserved2,
            padding=c.padding,
        )

    def to_container(self) -> dict[str, Any]:
        return {
            "bitmap_table_offset": self.bitmap_table_offset,
            "consistent_level": self.consistent_level,
            "level_bits": self.level_bits,
            "max_level": self.max_level,
            "granularity_bits": self.granularity_bits,
            "reserved": self.reserved,
            "reserved2": self.reserved2,
            "name": self.name,
            "padding": self.padding,
        }

    def build(self) -> bytes:
        return bytes(layout.LevelRecord.build(self.to_container()))

    @property
    def consistent_level_offset(self) -> int:
        return self.offset + layout.LEVEL_RECORD_FIELD.consistent_level

    @property
    def display_name(self) -> str:
        return self.name.decode("utf-8", errors="backslashreplace")


@dataclass(frozen=True, slots=True)
class HeaderArea:
    """Every byte of the first cluster, as parsed ("Header", "Header extensions").

    Laid out as: the header (``header_length`` bytes; 72 for v2), the
    extensions in file order, the end-of-extensions marker (8 raw bytes,
    None when the area ran out without one), ``gap`` up to the backing file
    name, the name itself (``backing_file``, None when absent or not wholly
    inside the cluster), and ``trailing`` up to the cluster's end (or the
    file's end when the file is shorter).  QEMU zero-fills ``gap`` and
    ``trailing``; they are kept raw so that :meth:`build` gives back the
    original bytes exactly.
    """

    header: Header
    extensions: tuple[Extension, ...]
    end_marker: bytes | None
    gap: bytes
    backing_file: bytes | None
    trailing: bytes

    def build(self) -> bytes:
        """The first cluster rebuilt from the parsed parts."""
        parts = [self.header.build(), *(ext.build() for ext in self.extensions)]
        if self.end_marker is not None:
            parts.append(self.end_marker)
        parts.append(self.gap)
        if self.backing_file is not None:
            parts.append(self.backing_file)
        parts.append(self.trailing)
        return b"".join(parts)


def select_entries(
    entries: Sequence[BitmapEntry], names: Sequence[str]
) -> tuple[list[BitmapEntry], list[str]]:
    """The entries QEMU knows by one of *names* (all when *names* is empty), in directory order.

    Also returns the names no entry has.  Names compare as QEMU compares
    them: the bytes of an entry's name up to its first NUL.
    """
    if not names:
        return list(entries), []
    chosen = [e for e in entries if any(e.named(n) for n in names)]
    missing = [n for n in names if not any(e.named(n) for e in entries)]
    return chosen, missing


@dataclass(frozen=True, slots=True)
class BitmapStructures:
    """A bitmap directory, its entries and their tables: what the bitmaps reference."""

    directory_offset: int
    directory_size: int
    directory_source: int  # file offset of the field naming the directory
    entries: Sequence[BitmapEntry]
    tables: Mapping[int, np.ndarray]  # by directory index; entries without one are skipped
