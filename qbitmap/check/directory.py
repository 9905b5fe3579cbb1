"""The bitmap directory and every rule QEMU applies to its entries.

QEMU's rules: docs/interop/qcow2.rst "Bitmap directory"; block/qcow2-bitmap.c
``bitmap_list_load`` and ``check_dir_entry``.  The directory is decoded once,
by :meth:`qbitmap.format.Image.read_directory` (bounded: it lies inside the
file, within QEMU's 64 MiB limit, and at most nb_bitmaps entries are parsed);
this module judges what it returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from qbitmap.check.context import Context
from qbitmap.check.findings import Finding, Severity
from qbitmap.format import BitmapEntry, BitmapFlag, BitmapsExtension, Geometry, Image, layout
from qbitmap.format.image import Directory

_DIRECTORY_CODES = {"broken": "bitmap-directory-broken", "count": "bitmap-directory-count-mismatch"}


def _dir_finding(code: str, message: str, offset: int | None, fld: str) -> Finding:
    return Finding(code, message, offset=offset, field=fld, area="bitmaps")


def extension_findings(image: Image, ext: BitmapsExtension) -> Iterator[Finding]:
    """QEMU's checks on the extension's fields (``qcow2_read_extensions``)."""
    if ext.reserved32:
        yield _dir_finding(
            "bitmaps-extension-reserved",
            f"the bitmaps extension's reserved field is {ext.reserved32:#x}, it must be 0 "
            "(QEMU refuses the image)",
            ext.field_offset("reserved32"),
            "reserved32",
        )
    if ext.nb_bitmaps == 0:
        yield _dir_finding(
            "bitmaps-count-zero",
            "the bitmaps extension says nb_bitmaps is 0 (QEMU refuses the image)",
            ext.field_offset("nb_bitmaps"),
            "nb_bitmaps",
        )
    elif ext.nb_bitmaps > layout.QCOW2_MAX_BITMAPS:
        yield _dir_finding(
            "bitmaps-count-too-large",
            f"nb_bitmaps is {ext.nb_bitmaps}, QEMU's limit is {layout.QCOW2_MAX_BITMAPS}",
            ext.field_offset("nb_bitmaps"),
            "nb_bitmaps",
        )
    if ext.bitmap_directory_offset % image.cluster_size:
        yield _dir_finding(
            "bitmap-directory-unaligned",
            f"bitmap_directory_offset {ext.bitmap_directory_offset:#x} is not a multiple of the "
            f"cluster size {image.cluster_size}",
            ext.field_offset("bitmap_directory_offset"),
            "bitmap_directory_offset",
        )
    if ext.bitmap_directory_size > layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        yield _dir_finding(
            "bitmap-directory-too-large",
            f"bitmap_directory_size is {ext.bitmap_directory_size}, QEMU's limit is "
            f"{layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE}",
            ext.field_offset("bitmap_directory_size"),
            "bitmap_directory_size",
        )
    elif ext.bitmap_directory_size == 0:
        yield _dir_finding(
            "bitmap-directory-empty",
            "bitmap_directory_size is 0 (QEMU: 'Requested bitmap directory size is zero')",
            ext.field_offset("bitmap_directory_size"),
            "bitmap_directory_size",
        )
    elif ext.bitmap_directory_offset + ext.bitmap_directory_size > image.file_size:
        yield _dir_finding(
            "bitmap-directory-outside-file",
            f"the bitmap directory ({ext.bitmap_directory_size} bytes at "
            f"{ext.bitmap_directory_offset:#x}) extends past the end of the file "
            f"({image.file_size} bytes)",
            ext.field_offset("bitmap_directory_offset"),
            "bitmap_directory_offset",
        )


def directory_findings(directory: Directory) -> Iterator[Finding]:
    """The directory's structural problem, if the decoder met one it could read past."""
    code = _DIRECTORY_CODES.get(directory.problem or "")
    if code is not None and directory.error is not None:
        error = directory.error
        yield _dir_finding(code, error.reason, error.offset, error.field or "bitmap directory")


def entry_findings(image: Image, entry: BitmapEntry) -> Iterator[Finding]:
    """``check_dir_entry`` and the other per-entry rules, one finding per broken rule."""
    cs = image.cluster_size
    name = entry.display_name
    if entry.extra_data:
        yield Finding.for_bitmap(
            entry,
            "bitmap-extra-data",
            f"bitmap {name!r} has {len(entry.extra_data)} bytes of extra data "
            "(QEMU: 'Bitmap extra data is not supported')",
            entry.field_offset("extra_data_size"),
            "extra_data_size",
        )
    if entry.bitmap_table_size == 0:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-size-zero",
            f"bitmap {name!r} has bitmap_table_size 0",
            entry.field_offset("bitmap_table_size"),
            "bitmap_table_size",
        )
    if entry.bitmap_table_offset == 0:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-offset-zero",
            f"bitmap {name!r} has bitmap_table_offset 0",
            entry.field_offset("bitmap_table_offset"),
            "bitmap_table_offset",
        )
    elif entry.bitmap_table_offset % cs:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-unaligned",
            f"bitmap {name!r} has bitmap_table_offset {entry.bitmap_table_offset:#x}, which is not "
            f"a multiple of the cluster size {cs}",
            entry.field_offset("bitmap_table_offset"),
            "bitmap_table_offset",
        )
    if entry.bitmap_table_size > layout.BME_MAX_TABLE_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-table-too-large",
            f"bitmap {name!r} has bitmap_table_size {entry.bitmap_table_size}, QEMU's limit is "
            f"{layout.BME_MAX_TABLE_SIZE}",
            entry.field_offset("bitmap_table_size"),
            "bitmap_table_size",
        )
    if not entry.granularity_valid:
        yield Finding.for_bitmap(
            entry,
            "bitmap-granularity-invalid",
            f"bitmap {name!r} has granularity_bits {entry.granularity_bits}, QEMU accepts "
            f"{layout.BME_MIN_GRANULARITY_BITS}..{layout.BME_MAX_GRANULARITY_BITS}",
            entry.field_offset("granularity_bits"),
            "granularity_bits",
        )
    if int(entry.flags) & layout.BME_RESERVED_FLAGS:
        extra = int(entry.flags) & layout.BME_RESERVED_FLAGS
        what = (
            " (extra_data_compatible, which QEMU refuses)"
            if extra == BitmapFlag.EXTRA_DATA_COMPATIBLE
            else ""
        )
        yield Finding.for_bitmap(
            entry,
            "bitmap-flags-reserved",
            f"bitmap {name!r} has flags {int(entry.flags):#x}: reserved bits {extra:#x} are set{what}",
            entry.field_offset("flags"),
            "flags",
        )
    if len(entry.name) > layout.BME_MAX_NAME_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-name-too-long",
            f"bitmap {name[:40]!r}... has name_size {len(entry.name)}, QEMU's limit is {layout.BME_MAX_NAME_SIZE}",
            entry.field_offset("name_size"),
            "name_size",
        )
    if entry.type != layout.BT_DIRTY_TRACKING_BITMAP:
        yield Finding.for_bitmap(
            entry,
            "bitmap-type-invalid",
            f"bitmap {name!r} has type {entry.type}, only 1 (dirty tracking) is defined",
            entry.field_offset("type"),
            "type",
        )
    phys = entry.bitmap_table_size * cs
    if phys > layout.BME_MAX_PHYS_SIZE:
        yield Finding.for_bitmap(
            entry,
            "bitmap-data-too-large",
            f"bitmap {name!r} has {entry.bitmap_table_size} table entries of {cs}-byte clusters, "
            f"more than QEMU's limit of {layout.BME_MAX_PHYS_SIZE} bytes of bitmap data",
            entry.field_offset("bitmap_table_size"),
            "bitmap_table_size",
        )
    if image.virtual_size == 0 and entry.in_use:
        # check_dir_entry refuses a table of 0 entries, and a disk of 0 bytes needs exactly 0:
        # once in_use is cleared QEMU refuses every table this bitmap could have.
        yield Finding.for_bitmap(
            entry,
            "bitmap-disk-size-zero",
            f"in-use bitmap {name!r} belongs to a disk of 0 bytes, for which QEMU accepts no "
            "bitmap table (a table of 0 entries 'doesn't satisfy the constraints'), so it can "
            "never be brought back; 'qbitmap recover --drop-broken' drops it",
            layout.HEADER_FIELD.size,
            "size",
        )
    elif entry.granularity_valid and 0 < entry.bitmap_table_size <= layout.BME_MAX_TABLE_SIZE:
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
                    entry.field_offset("bitmap_table_size"),
                    "bitmap_table_size",
                )
            elif image.virtual_size > covers:
                yield Finding.for_bitmap(
                    entry,
                    "bitmap-table-too-small",
                    f"bitmap {name!r} has {actual} table entries covering {covers} bytes, the disk "
                    f"has {image.virtual_size} (QEMU: 'doesn't satisfy the constraints')",
                    entry.field_offset("bitmap_table_size"),
                    "bitmap_table_size",
                )
            else:
                yield Finding.for_bitmap(
                    entry,
                    "bitmap-table-size-mismatch",
                    f"bitmap {name!r} has {actual} table entries, QEMU requires exactly {expected} "
                    f"for a disk of {image.virtual_size} bytes at granularity {entry.granularity}",
                    entry.field_offset("bitmap_table_size"),
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
        at = entry.name_offset
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
                entry.field_offset("name_size"),
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


def loads_past_eof(image: Image) -> bool:
    """Whether QEMU loads the bitmap directory although the end of the file cuts it short.

    QEMU reads the bytes past the end of the file as zeros (a short read of
    the file is padded).  True when the directory read that way is whole and
    every entry and name passes QEMU's rules: then its bitmaps are ones QEMU
    accepts, not broken ones.
    """
    if image.bitmaps_extension is None:
        return False
    directory = image.read_directory(past_eof_as_zeros=True)
    if directory.error is not None or not directory.entries:
        return False
    findings = [f for e in directory.entries for f in entry_findings(image, e)]
    findings += name_findings(list(directory.entries))
    return all(f.severity < Severity.CORRUPT for f in findings)


def check(ctx: Context) -> Iterator[Finding]:
    """Directory walk, per-entry rules and name rules for an extension QEMU would load."""
    ext = ctx.extension
    if ext is None or not ctx.honored:
        return
    yield from extension_findings(ctx.image, ext)
    directory = ctx.image.read_directory()
    if directory.problem == "location" or ext.bitmap_directory_size == 0:
        return
    ctx.directory_readable = True
    ctx.entries = list(directory.entries)
    ctx.directory_complete = directory.error is None
    yield from directory_findings(directory)
    for entry in directory.entries:
        yield from entry_findings(ctx.image, entry)
    yield from name_findings(ctx.entries)
