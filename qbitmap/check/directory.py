"""The bitmap directory and every rule QEMU applies to its entries.

Sources: qcow2-digest 3.2 and 4.2; QEMU block/qcow2-bitmap.c ``bitmap_list_load``
and ``check_dir_entry``.  The walk is bounded: the directory must lie inside the
file and within QEMU's 64 MiB limit, and at most 65536 entries are parsed (one
more than QEMU allows), so a lying size or count costs no more than that.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.format import BitmapEntry, BitmapFlag, BitmapsExtension, Geometry, Image, layout
from qbitmap.format.image import (
    BME_MAX_GRANULARITY_BITS,
    BME_MAX_NAME_SIZE,
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BME_MIN_GRANULARITY_BITS,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    QCOW2_MAX_BITMAPS,
)

_ENTRY_HEAD = struct.Struct(">QIIBBHI")
_RESERVED_FLAGS = 0xFFFFFFFC
MAX_WALK = QCOW2_MAX_BITMAPS + 1


@dataclass
class DirectoryScan:
    """The directory as far as it could be walked."""

    entries: list[BitmapEntry] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _dir_finding(code: str, message: str, offset: int | None, fld: str) -> Finding:
    return Finding(code, message, offset=offset, field=fld, area="bitmaps")


def extension_findings(image: Image, ext: BitmapsExtension) -> Iterator[Finding]:
    """QEMU's checks on the extension's fields (``qcow2_read_extensions``)."""
    if ext.reserved32:
        yield _dir_finding(
            "bitmaps-extension-reserved",
            f"the bitmaps extension's reserved field is {ext.reserved32:#x}, it must be 0 "
            "(QEMU refuses the image)",
            ext.offset + 4,
            "reserved32",
        )
    if ext.nb_bitmaps == 0:
        yield _dir_finding(
            "bitmaps-count-zero",
            "the bitmaps extension says nb_bitmaps is 0 (QEMU refuses the image)",
            ext.offset,
            "nb_bitmaps",
        )
    elif ext.nb_bitmaps > QCOW2_MAX_BITMAPS:
        yield _dir_finding(
            "bitmaps-count-too-large",
            f"nb_bitmaps is {ext.nb_bitmaps}, QEMU's limit is {QCOW2_MAX_BITMAPS}",
            ext.offset,
            "nb_bitmaps",
        )
    if ext.bitmap_directory_offset % image.cluster_size:
        yield _dir_finding(
            "bitmap-directory-unaligned",
            f"bitmap_directory_offset {ext.bitmap_directory_offset:#x} is not a multiple of the "
            f"cluster size {image.cluster_size}",
            ext.offset + 16,
            "bitmap_directory_offset",
        )
    if ext.bitmap_directory_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        yield _dir_finding(
            "bitmap-directory-too-large",
            f"bitmap_directory_size is {ext.bitmap_directory_size}, QEMU's limit is "
            f"{QCOW2_MAX_BITMAP_DIRECTORY_SIZE}",
            ext.offset + 8,
            "bitmap_directory_size",
        )
    elif ext.bitmap_directory_size == 0:
        yield _dir_finding(
            "bitmap-directory-empty",
            "bitmap_directory_size is 0 (QEMU: 'Requested bitmap directory size is zero')",
            ext.offset + 8,
            "bitmap_directory_size",
        )
    elif ext.bitmap_directory_offset + ext.bitmap_directory_size > image.file_size:
        yield _dir_finding(
            "bitmap-directory-outside-file",
            f"the bitmap directory ({ext.bitmap_directory_size} bytes at "
            f"{ext.bitmap_directory_offset:#x}) extends past the end of the file "
            f"({image.file_size} bytes)",
            ext.offset + 16,
            "bitmap_directory_offset",
        )


def directory_readable(image: Image, ext: BitmapsExtension) -> bool:
    """Whether the directory's location is sane enough to read it."""
    size, offset = ext.bitmap_directory_size, ext.bitmap_directory_offset
    return 0 < size <= QCOW2_MAX_BITMAP_DIRECTORY_SIZE and offset + size <= image.file_size


def scan_directory(image: Image, ext: BitmapsExtension) -> DirectoryScan:
    """Walk the directory entries (call only when :func:`directory_readable`)."""
    scan = DirectoryScan()
    offset, size = ext.bitmap_directory_offset, ext.bitmap_directory_size
    data = image.read(offset, size, what="bitmap directory")
    pos = 0
    while pos < size and len(scan.entries) < MAX_WALK:
        here = offset + pos
        index = len(scan.entries)
        if size - pos < layout.BITMAP_DIR_ENTRY_FIXED_SIZE:
            scan.findings.append(
                _dir_finding(
                    "bitmap-directory-broken",
                    f"the last {size - pos} bytes of the bitmap directory are too short for "
                    f"entry {index} (QEMU: 'Broken bitmap directory')",
                    here,
                    "bitmap directory entry",
                )
            )
            return scan
        table_offset, table_size, flags, btype, gbits, name_size, extra_size = (
            _ENTRY_HEAD.unpack_from(data, pos)
        )
        full = layout.dir_entry_size(name_size, extra_size)
        if pos + full > size:
            scan.findings.append(
                _dir_finding(
                    "bitmap-directory-broken",
                    f"entry {index} of the bitmap directory ({full} bytes with name_size "
                    f"{name_size} and extra_data_size {extra_size}) crosses the directory's "
                    "end (QEMU: 'Broken bitmap directory')",
                    here + 18,
                    "name_size",
                )
            )
            return scan
        fixed = pos + layout.BITMAP_DIR_ENTRY_FIXED_SIZE
        extra = data[fixed : fixed + extra_size]
        name = data[fixed + extra_size : fixed + extra_size + name_size]
        padding = data[fixed + extra_size + name_size : pos + full]
        scan.entries.append(
            BitmapEntry(
                offset=here,
                index=index,
                bitmap_table_offset=table_offset,
                bitmap_table_size=table_size,
                flags=BitmapFlag(flags),
                type=btype,
                granularity_bits=gbits,
                extra_data=bytes(extra),
                name=bytes(name),
                padding=bytes(padding),
            )
        )
        pos += full
    if pos < size:
        scan.findings.append(
            _dir_finding(
                "bitmap-directory-count-mismatch",
                f"the bitmap directory holds more than {MAX_WALK - 1} entries",
                ext.offset,
                "nb_bitmaps",
            )
        )
    elif len(scan.entries) != ext.nb_bitmaps:
        more = "more" if len(scan.entries) > ext.nb_bitmaps else "fewer"
        qemu = (
            "More bitmaps found than specified"
            if more == "more"
            else "Less bitmaps found than specified"
        )
        scan.findings.append(
            _dir_finding(
                "bitmap-directory-count-mismatch",
                f"the bitmap directory holds {len(scan.entries)} entries, {more} than nb_bitmaps "
                f"{ext.nb_bitmaps} (QEMU: '{qemu}')",
                ext.offset,
                "nb_bitmaps",
            )
        )
    return scan


def geometry_valid(entry: BitmapEntry) -> bool:
    return BME_MIN_GRANULARITY_BITS <= entry.granularity_bits <= BME_MAX_GRANULARITY_BITS


def table_located(image: Image, entry: BitmapEntry) -> bool:
    """Whether the table may be read: non-empty, aligned, bounded and inside the file."""
    off, n, cs = entry.bitmap_table_offset, entry.bitmap_table_size, image.cluster_size
    return (
        off != 0
        and off % cs == 0
        and 0 < n <= BME_MAX_TABLE_SIZE
        and n * cs <= BME_MAX_PHYS_SIZE
        and off + n * 8 <= image.file_size
    )


def entry_findings(image: Image, entry: BitmapEntry) -> Iterator[Finding]:
    """``check_dir_entry`` and the other per-entry rules, one finding per broken rule."""
    cs = image.cluster_size
    name = entry.display_name
    e = entry.offset
    if entry.extra_data:
        yield Finding.for_bitmap(
            entry,
            "bitmap-extra-data",
            f"bitmap {name!r} has {len(entry.extra_data)} bytes of extra data "
            "(QEMU: 'Bitmap extra data is not supported')",
            e + 20,
            "extra_data_size",
        )
    if entry.bitmap_table_size == 0:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-size-zero",
            f"bitmap {name!r} has bitmap_table_size 0",
            e + 8,
            "bitmap_table_size",
        )
    if entry.bitmap_table_offset == 0:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-offset-zero",
            f"bitmap {name!r} has bitmap_table_offset 0",
            e,
            "bitmap_table_offset",
        )
    elif entry.bitmap_table_offset % cs:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-unaligned",
            f"bitmap {name!r} has bitmap_table_offset {entry.bitmap_table_offset:#x}, which is not "
            f"a multiple of the cluster size {cs}",
            e,
            "bitmap_table_offset",
        )
    if entry.bitmap_table_size > BME_MAX_TABLE_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-too-large",
            f"bitmap {name!r} has bitmap_table_size {entry.bitmap_table_size}, QEMU's limit is "
            f"{BME_MAX_TABLE_SIZE}",
            e + 8,
            "bitmap_table_size",
        )
    if not geometry_valid(entry):
        yield Finding.for_bitmap(
            entry,
            "bitmap-granularity-invalid",
            f"bitmap {name!r} has granularity_bits {entry.granularity_bits}, QEMU accepts "
            f"{BME_MIN_GRANULARITY_BITS}..{BME_MAX_GRANULARITY_BITS}",
            e + 17,
            "granularity_bits",
        )
    if int(entry.flags) & _RESERVED_FLAGS:
        extra = int(entry.flags) & _RESERVED_FLAGS
        what = (
            " (extra_data_compatible, which QEMU refuses)"
            if extra == BitmapFlag.EXTRA_DATA_COMPATIBLE
            else ""
        )
        yield Finding.for_bitmap(
            entry,
            "bitmap-flags-reserved",
            f"bitmap {name!r} has flags {int(entry.flags):#x}: reserved bits {extra:#x} are set{what}",
            e + 12,
            "flags",
        )
    if len(entry.name) > BME_MAX_NAME_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-name-too-long",
            f"bitmap {name[:40]!r}... has name_size {len(entry.name)}, QEMU's limit is {BME_MAX_NAME_SIZE}",
            e + 18,
            "name_size",
        )
    if entry.type != 1:
        yield Finding.for_bitmap(
            entry,
            "bitmap-type-invalid",
            f"bitmap {name!r} has type {entry.type}, only 1 (dirty tracking) is defined",
            e + 16,
            "type",
        )
    phys = entry.bitmap_table_size * cs
    if phys > BME_MAX_PHYS_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-data-too-large",
            f"bitmap {name!r} has {entry.bitmap_table_size} table entries of {cs}-byte clusters, "
            f"more than QEMU's limit of {BME_MAX_PHYS_SIZE} bytes of bitmap data",
            e + 8,
            "bitmap_table_size",
        )
    if geometry_valid(entry) and 0 < entry.bitmap_table_size <= BME_MAX_TABLE_SIZE:
        expected = Geometry(image.virtual_size, entry.granularity, cs).table_size
        actual = entry.bitmap_table_size
        if actual != expected:
            covers = (phys * 8) << entry.granularity_bits
            if entry.in_use:
                yield Finding.for_bitmap(
                    entry,
                    "bitmap-table-size-stale",
                    f"in-use bitmap {name!r} has {actual} table entries, the disk of "
                    f"{image.virtual_size} bytes needs {expected}: the bitmap predates a resize",
                    e + 8,
                    "bitmap_table_size",
                )
            elif image.virtual_size > covers:
                yield Finding.for_bitmap(
                    entry,
                    "bitmap-table-too-small",
                    f"bitmap {name!r} has {actual} table entries covering {covers} bytes, the disk "
                    f"has {image.virtual_size} (QEMU: 'doesn't satisfy the constraints')",
                    e + 8,
                    "bitmap_table_size",
                )
            else:
                yield Finding.for_bitmap(
                    entry,
                    "bitmap-table-size-mismatch",
                    f"bitmap {name!r} has {actual} table entries, QEMU requires exactly {expected} "
                    f"for a disk of {image.virtual_size} bytes at granularity {entry.granularity}",
                    e + 8,
                    "bitmap_table_size",
                )


def name_findings(entries: list[BitmapEntry]) -> Iterator[Finding]:
    """Names as QEMU reads them: C strings, unique ('Bitmap already exists').

    A NUL byte ends the name for QEMU.  When that makes QEMU's own copy of
    the entry shorter than the one on disk, its read-write open fails
    (``update_ext_header_and_dir_in_place``: "Can't update bitmap
    directory") after clearing autoclear bit 0, and every bitmap is lost.
    """
    seen: Counter[bytes] = Counter()
    for entry in entries:
        name = entry.qemu_name
        at = entry.offset + 24 + len(entry.extra_data)
        shown = name.decode("utf-8", "backslashreplace")
        if name != entry.name:
            shrinks = layout.dir_entry_size(len(name), len(entry.extra_data)) != entry.size
            yield Finding.for_bitmap(
                entry,
                "bitmap-name-nul-unstorable" if shrinks else "bitmap-name-nul",
                f"bitmap entry {entry.index} has the name {entry.display_name!r}, which holds a "
                f"NUL byte: QEMU knows it as {shown!r}"
                + (
                    ", and its copy of the entry is shorter than the one on disk, so a "
                    "read-write open fails ('Can't update bitmap directory') and leaves every "
                    "bitmap lost"
                    if shrinks
                    else ""
                ),
                at + len(name),
                "name",
            )
        elif not name:
            yield Finding.for_bitmap(
                entry,
                "bitmap-name-empty",
                f"bitmap entry {entry.index} has an empty name: QEMU loads it, but no command "
                "can name it",
                entry.offset + 18,
                "name_size",
            )
        if seen[name]:
            yield Finding.for_bitmap(
                entry,
                "bitmap-name-duplicate",
                f"bitmap entry {entry.index} repeats the name {shown!r} as QEMU reads it "
                "(QEMU: 'Bitmap already exists')",
                at,
                "name",
            )
        seen[name] += 1


def check(ctx: Context) -> Iterator[Finding]:
    """Directory walk, per-entry rules and name rules for an extension QEMU would load."""
    ext = ctx.extension
    if ext is None or not ctx.honored:
        return
    yield from extension_findings(ctx.image, ext)
    if not directory_readable(ctx.image, ext):
        return
    ctx.directory_readable = True
    scan = scan_directory(ctx.image, ext)
    ctx.entries = scan.entries
    ctx.directory_complete = not scan.findings
    yield from scan.findings
    for entry in scan.entries:
        yield from entry_findings(ctx.image, entry)
        if table_located(ctx.image, entry):
            ctx.table_located.add(entry.index)
    yield from name_findings(scan.entries)
