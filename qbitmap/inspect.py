"""What ``qbitmap dump`` reports: plain data built from the format layer.

The functions here return dictionaries of JSON-ready values (bytes as hex
strings, flags as the words ``qemu-img info`` uses), shared by the JSON
writer and the rich renderer so the two views cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qbitmap.format import (
    BitmapEntry,
    Image,
    dirty_bytes,
    extents,
    geometry_of,
    iter_chunks,
    layout,
)
from qbitmap.format.model import HEADER_FIELDS, Extension


def feature_words(image: Image) -> dict[str, list[str]]:
    """Set feature bits by class, named from the image's own feature table."""
    names = image.feature_names()
    header = image.header
    out: dict[str, list[str]] = {}
    for kind, label, word in (
        (layout.FEATURE_INCOMPATIBLE, "incompatible", header.incompatible_features),
        (layout.FEATURE_COMPATIBLE, "compatible", header.compatible_features),
        (layout.FEATURE_AUTOCLEAR, "autoclear", header.autoclear_features),
    ):
        bits = [bit for bit in range(64) if (word or 0) >> bit & 1]
        out[label] = [names.get((kind, bit), f"unknown bit {bit}") for bit in bits]
    return out


def header_dict(image: Image) -> dict[str, Any]:
    header = image.header
    out: dict[str, Any] = {}
    for name in HEADER_FIELDS:
        value = getattr(header, name)
        out[name] = value.hex() if isinstance(value, bytes) else value
    return out


def _cstring(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def extension_dict(image: Image, ext: Extension) -> dict[str, Any]:
    out: dict[str, Any] = {
        "offset": ext.offset,
        "magic": f"{ext.magic:#010x}",
        "name": ext.name,
        "length": ext.length,
    }
    if ext.magic in (layout.EXT_BACKING_FORMAT, layout.EXT_DATA_FILE):
        out["value"] = _cstring(ext.data)
    elif ext.magic == layout.EXT_FEATURE_NAMES:
        entries = []
        for i in range(len(ext.data) // 48):
            entry = layout.FeatureNameEntry.parse(ext.data[i * 48 : (i + 1) * 48])
            kind = {0: "incompatible", 1: "compatible", 2: "autoclear"}.get(entry.type, str(entry.type))
            entries.append(
                {"type": kind, "bit": entry.bit, "name": _cstring(entry.name.split(b"\0", 1)[0])}
            )
        out["features"] = entries
    elif ext.magic == layout.EXT_BITMAPS and ext.length == 24:
        c = layout.BitmapsExtension.parse(ext.data)
        out.update(
            nb_bitmaps=c.nb_bitmaps,
            reserved32=c.reserved32,
            bitmap_directory_size=c.bitmap_directory_size,
            bitmap_directory_offset=c.bitmap_directory_offset,
        )
    elif ext.magic == layout.EXT_CRYPTO and ext.length == 16:
        c = layout.CryptoHeaderPointer.parse(ext.data)
        out.update(crypto_header_offset=c.offset, crypto_header_length=c.length)
    elif ext.magic == layout.EXT_LEVELS:
        levels = image.read_levels()
        assert levels is not None
        out["version"] = levels.version
        out["nb_records"] = levels.nb_records
        out["records"] = [
            {
                "offset": r.offset,
                "name": r.display_name,
                "bitmap_table_offset": r.bitmap_table_offset,
                "consistent_level": r.consistent_level,
                "level_bits": r.level_bits,
                "max_level": r.max_level,
                "granularity_bits": r.granularity_bits,
            }
            for r in levels.records
        ]
        if levels.error is not None:
            out["error"] = str(levels.error)
    else:
        out["data"] = ext.data.hex()
    return out


@dataclass(slots=True)
class BitmapView:
    """One bitmap as dump shows it; the data is read lazily."""

    image: Image
    entry: BitmapEntry

    def summary(self) -> dict[str, Any]:
        e = self.entry
        return {
            "name": e.display_name,
            "granularity": e.granularity,
            "flags": e.flag_words,
            "flags_raw": int(e.flags),
            "type": e.type,
            "table_offset": e.bitmap_table_offset,
            "table_size": e.bitmap_table_size,
            "directory_offset": e.offset,
            "in_use": e.in_use,
            "stale": e.in_use,
        }

    def dirty_bytes(self) -> int:
        geo = geometry_of(self.image, self.entry)
        return dirty_bytes(geo, iter_chunks(self.image, self.entry))

    def extents(self) -> Iterator[tuple[int, int]]:
        geo = geometry_of(self.image, self.entry)
        return extents(geo, iter_chunks(self.image, self.entry))

    def dirty_and_extents(self) -> tuple[int, list[tuple[int, int]]]:
        """Dirty bytes and extents from a single pass over the data."""
        runs = list(self.extents())
        return sum(length for _, length in runs), runs
