"""What ``qbitmap dump`` reports: plain data built from the format layer.

:func:`dump_report` reads an image and returns a :class:`DumpReport`: a
dictionary of JSON-ready values (bytes as hex strings, flags as the words
``qemu-img info --output=json`` uses) plus, per bitmap, a source of its dirty
extents that streams them from the still open image in blocks of numpy
arrays, so that no output form holds every range at once.  The JSON writer,
the line writer and the rich renderer all start from it, so the views cannot
drift apart.  Nothing here prints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qbitmap.errors import UsageError
from qbitmap.format import (
    AutoclearFeature,
    BitmapEntry,
    Geometry,
    Image,
    dirty_bytes,
    extent_blocks,
    geometry_of,
    iter_chunks,
    layout,
    select_entries,
)
from qbitmap.format.model import HEADER_FIELDS, Extension

FEATURE_KINDS = {
    layout.FEATURE_INCOMPATIBLE: "incompatible",
    layout.FEATURE_COMPATIBLE: "compatible",
    layout.FEATURE_AUTOCLEAR: "autoclear",
}

#: A block of one bitmap's dirty ranges: ``(starts, lengths)`` in bytes, sorted and merged.
Extents = tuple[np.ndarray, np.ndarray]

#: One bitmap's dirty ranges, read from the open image again at each call, as blocks.
ExtentSource = Callable[[], Iterator[Extents]]


def feature_words(image: Image) -> dict[str, list[str]]:
    """Set feature bits by class, named from the image's own feature table.

    Bits the image's table does not name fall back to QEMU's names, then to
    ``"unknown bit N"``.  Version 2 images have no feature words: empty lists.
    """
    names = image.feature_names()
    header = image.header
    out: dict[str, list[str]] = {}
    for kind, word in (
        (layout.FEATURE_INCOMPATIBLE, header.incompatible_features),
        (layout.FEATURE_COMPATIBLE, header.compatible_features),
        (layout.FEATURE_AUTOCLEAR, header.autoclear_features),
    ):
        bits = [bit for bit in range(64) if (word or 0) >> bit & 1]
        out[FEATURE_KINDS[kind]] = [names.get((kind, bit), f"unknown bit {bit}") for bit in bits]
    return out


def header_dict(image: Image) -> dict[str, Any]:
    """Every header field by its spec name; raw byte fields as hex, absent ones as None."""
    header = image.header
    out: dict[str, Any] = {}
    for name in HEADER_FIELDS:
        value = getattr(header, name)
        out[name] = value.hex() if isinstance(value, bytes) else value
    return out


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def extension_dict(image: Image, ext: Extension) -> dict[str, Any]:
    """One header extension: where it is, what it is, and its decoded contents.

    Known types are decoded (strings, the feature table, the bitmaps
    extension, the encryption header pointer, qbitmap's level records); an
    unknown type, or a known one of the wrong length, keeps its data as hex.
    """
    out: dict[str, Any] = {
        "offset": ext.offset,
        "magic": f"{ext.magic:#010x}",
        "name": ext.name,
        "length": ext.length,
    }
    if ext.magic in (layout.EXT_BACKING_FORMAT, layout.EXT_DATA_FILE):
        out["value"] = _text(ext.data)
    elif ext.magic == layout.EXT_FEATURE_NAMES:
        entries = []
        for i in range(len(ext.data) // 48):
            entry = layout.FeatureNameEntry.parse(ext.data[i * 48 : (i + 1) * 48])
            kind = FEATURE_KINDS.get(entry.type, str(entry.type))
            entries.append(
                {"type": kind, "bit": entry.bit, "name": _text(entry.name.split(b"\0", 1)[0])}
            )
        out["features"] = entries
        if len(ext.data) % 48:
            out["trailing"] = ext.data[len(ext.data) - len(ext.data) % 48 :].hex()
    elif ext.magic == layout.EXT_BITMAPS and ext.length == layout.BitmapsExtension.sizeof():
        c = layout.BitmapsExtension.parse(ext.data)
        out.update(
            nb_bitmaps=c.nb_bitmaps,
            reserved32=c.reserved32,
            bitmap_directory_size=c.bitmap_directory_size,
            bitmap_directory_offset=c.bitmap_directory_offset,
        )
    elif ext.magic == layout.EXT_CRYPTO and ext.length == layout.CryptoHeaderPointer.sizeof():
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


def bitmap_summary(entry: BitmapEntry, *, extension_consistent: bool) -> dict[str, Any]:
    """A directory entry as dump shows it (no data read)."""
    return {
        "name": entry.display_name,
        "granularity": entry.granularity,
        "flags": entry.flag_words,
        "flags_raw": int(entry.flags),
        "type": entry.type,
        "table_offset": entry.bitmap_table_offset,
        "table_size": entry.bitmap_table_size,
        "directory_offset": entry.offset,
        "in_use": entry.in_use,
        # On-disk data is stale when a writer did not close the bitmap, or when
        # the whole extension is flagged inconsistent (autoclear bit 0 clear).
        "stale": entry.in_use or not extension_consistent,
    }


def in_use_warning(name: str, writer_running: bool) -> str:
    """Why an in-use bitmap's on-disk contents are stale: a live writer, or one that stopped."""
    if writer_running:
        return (
            f"bitmap {name!r} is in use: the image is held by a running writer, whose bitmaps "
            "live in its memory, so the on-disk contents shown are stale"
        )
    return (
        f"bitmap {name!r} is in use (its writer did not close it cleanly): the on-disk "
        "contents shown are stale"
    )


@dataclass
class DumpReport:
    """Everything ``qbitmap dump`` shows, ready for any renderer.

    The extent sources read the image: render the report before closing it.
    """

    info: dict[str, Any]
    #: Per bitmap, in ``info["bitmaps"]`` order: its extent source, or None when not asked for.
    extents: list[ExtentSource | None] = field(default_factory=list)
    #: Things to tell the user on stderr (stale data), one sentence each.
    warnings: list[str] = field(default_factory=list)
    #: Whether a running writer holds the image (asked only when a bitmap is in use).
    writer_running: bool = False


def _extent_source(image: Image, entry: BitmapEntry, geo: Geometry) -> Iterator[Extents]:
    return extent_blocks(geo, iter_chunks(image, entry))


def select_bitmaps(
    entries: Sequence[BitmapEntry], names: Sequence[str], *, filename: str
) -> list[BitmapEntry]:
    """The entries QEMU knows by one of *names* (all when empty), in directory order.

    Raises UsageError (exit 64) for a name the image does not have.
    """
    chosen, missing = select_entries(entries, names)
    if missing:
        raise UsageError(f"{filename}: no bitmap named {missing[0]!r}")
    return chosen

def dump_report(
    image: Image,
    *,
    filename: str,
    names: Sequence[str] = (),
    with_extents: bool = False,
    writer_running: Callable[[], bool] | None = None,
) -> DumpReport:
    """Read what dump shows from *image*.

    Raises ImageFormatError when a structure dump needs (header extensions,
    bitmap directory, bitmap tables and data) cannot be read; UsageError for
    an unknown name in *names*.  Every selected bitmap's data is read here
    once (its dirty byte count), so a damaged table or data cluster is
    reported before anything is printed; with *with_extents* each bitmap
    also gets an extent source, which reads the data again while the
    report is rendered.  *writer_running* says whether a running process
    holds the image for writing; it is asked once, when an in-use bitmap is
    met, to tell a live writer's bitmaps from a crashed writer's.
    """
    if image.extension_error is not None:
        raise image.extension_error
    directory = image.read_directory()
    if directory.error is not None:
        raise directory.error
    entries = select_bitmaps(directory.entries, names, filename=filename)
    header = image.header
    consistent = header.version >= 3 and bool(header.autoclear & AutoclearFeature.BITMAPS)
    info: dict[str, Any] = {
        "filename": filename,
        "virtual_size": image.virtual_size,
        "cluster_size": image.cluster_size,
        "version": header.version,
        "header": header_dict(image),
        "features": feature_words(image),
        "extensions": [extension_dict(image, ext) for ext in image.extensions],
    }
    if header.backing_file_offset:
        raw = image.pread(header.backing_file_offset, min(header.backing_file_size, 1023))
        info["backing_file"] = _text(raw)
    report = DumpReport(info)
    if directory.entries and not consistent:
        why = (
            "the image is version 2"
            if header.version < 3
            else "autoclear bit 0 (bitmaps) is clear: a program without bitmap support wrote it"
        )
        report.warnings.append(
            f"{why}, so QEMU considers every bitmap inconsistent; the on-disk contents are stale"
        )
    bitmaps: list[dict[str, Any]] = []
    asked = False
    for entry in entries:
        summary = bitmap_summary(entry, extension_consistent=consistent)
        geo = geometry_of(image, entry)
        summary["dirty_bytes"] = dirty_bytes(geo, iter_chunks(image, entry))
        report.extents.append(
            functools.partial(_extent_source, image, entry, geo) if with_extents else None
        )
        bitmaps.append(summary)
        if entry.in_use:
            if writer_running is not None and not asked:
                report.writer_running = writer_running()
                asked = True
            report.warnings.append(in_use_warning(entry.display_name, report.writer_running))
    info["bitmaps"] = bitmaps
    return report
