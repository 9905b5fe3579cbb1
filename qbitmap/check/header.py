"""Header-level findings: feature bits, the extension area, the bitmaps extension's presence.

QEMU's rules: docs/interop/qcow2.rst "Header", "Header extensions"; block/qcow2.c
``qcow2_do_open`` and ``qcow2_read_extensions`` (the bitmaps case checks the
length first, then ignores the extension when autoclear bit 0 is clear --
always the case for v2, which has no autoclear field).
"""

from __future__ import annotations

from collections.abc import Iterator

from qbitmap import lockbytes
from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.format import AutoclearFeature, BitmapsExtension, IncompatibleFeature, layout

KNOWN_INCOMPATIBLE = 0x1F
H = layout.HEADER_FIELD


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    header = image.header
    if ctx.held_locks:
        held = f"lock bytes {', '.join(map(str, ctx.held_locks))}: {lockbytes.describe(ctx.held_locks)}"
        if lockbytes.writer_present(ctx.held_locks):
            yield Finding(
                "image-held-by-writer",
                f"the image is held by a running writer ({held}): its bitmaps live in its "
                "memory and what is on disk is not their state; check again once it has stopped, "
                "or ask the writer itself (QMP query-block)",
                offset=None,
                field="lock bytes",
            )
        else:
            yield Finding(
                "image-in-use-live",
                f"another process has the image open for reading ({held})",
                offset=None,
                field="lock bytes",
            )
    if header.version >= 3:
        incompat = header.incompatible_features or 0
        unknown = incompat & ~KNOWN_INCOMPATIBLE
        if unknown:
            yield Finding(
                "image-unsupported-feature",
                f"incompatible_features is {incompat:#x}: bits {unknown:#x} are unknown, so the image "
                "cannot be interpreted (QEMU: 'Unsupported qcow2 feature(s)')",
                offset=H.incompatible_features,
                field="incompatible_features",
            )
        if incompat & IncompatibleFeature.CORRUPT:
            yield Finding(
                "image-marked-corrupt",
                "incompatible feature bit 1 (corrupt) is set: QEMU detected metadata damage; "
                "'qemu-img check -r all' may repair it",
                offset=H.incompatible_features,
                field="incompatible_features",
            )
        if incompat & IncompatibleFeature.DIRTY:
            yield Finding(
                "image-dirty",
                "incompatible feature bit 0 (dirty) is set: refcounts may lag behind (lazy "
                "refcounts), so they were not compared",
                offset=H.incompatible_features,
                field="incompatible_features",
            )
    yield from _header_fields(ctx)
    if image.extension_error is not None:
        err = image.extension_error
        yield Finding(
            "header-extensions-invalid",
            err.reason,
            offset=err.offset,
            field=err.field,
        )
    elif image.end_marker_offset is not None:
        # QEMU checks the length of the end marker too before it stops.
        where = image.end_marker_offset
        length = image.end_marker_length
        if where + layout.EXTENSION_HEADER_SIZE + length > image.extension_area_end:
            yield Finding(
                "header-extensions-invalid",
                f"the end-of-extensions marker claims {length} bytes of data, past the end of the "
                f"extension area at {image.extension_area_end:#x} (QEMU: 'Header extension too large')",
                offset=where + layout.EXTENSION_FIELD.length,
                field="length",
            )
    yield from _bitmaps_extension(ctx)


def _bad(message: str, fld: str) -> Finding:
    """A header field QEMU refuses, found at its offset in the header."""
    return Finding("header-invalid", message, offset=getattr(H, fld), field=fld)


def _header_fields(ctx: Context) -> Iterator[Finding]:
    """The remaining ``qcow2_do_open`` checks on header fields (QEMU refuses to open)."""
    image = ctx.image
    header = image.header
    cs = image.cluster_size
    if header.backing_file_offset > cs:
        yield _bad(
            f"backing_file_offset {header.backing_file_offset:#x} lies beyond the first cluster "
            "(QEMU: 'Invalid backing file offset')",
            "backing_file_offset",
        )
    elif header.backing_file_offset and header.backing_file_size > min(
        1023, cs - header.backing_file_offset
    ):
        yield _bad(
            f"backing_file_size {header.backing_file_size} does not fit (QEMU: 'Backing file name "
            "too long')",
            "backing_file_size",
        )
    if header.version >= 3:
        incompat = header.incompatible_features or 0
        ctype = header.compression_type or 0
        if ctype > 1:
            yield _bad(
                f"compression_type is {ctype}, QEMU knows 0 (zlib) and 1 (zstd)",
                "compression_type",
            )
        elif bool(ctype) != bool(incompat & IncompatibleFeature.COMPRESSION_TYPE):
            yield _bad(
                f"compression_type is {ctype} but incompatible feature bit 3 is "
                f"{'clear' if ctype else 'set'}",
                "compression_type" if ctype else "incompatible_features",
            )
        if incompat & IncompatibleFeature.EXTENDED_L2 and image.cluster_bits < 14:
            yield _bad(
                f"extended L2 entries need clusters of at least 16 KiB, these are {cs} bytes "
                "(QEMU: 'Unsupported subcluster size')",
                "cluster_bits",
            )
        autoclear = header.autoclear_features or 0
        if (
            autoclear & AutoclearFeature.RAW_EXTERNAL_DATA
            and not incompat & IncompatibleFeature.EXTERNAL_DATA_FILE
        ):
            yield _bad(
                "autoclear bit 1 (raw external data) is set without an external data file "
                "(QEMU: 'data-file-raw requires a data file')",
                "autoclear_features",
            )
    if header.crypt_method > 2:
        yield _bad(
            f"crypt_method is {header.crypt_method}, QEMU knows 0, 1 (AES) and 2 (LUKS)",
            "crypt_method",
        )
    l2_entries = cs // (
        16 if header.version >= 3 and (header.incompatible_features or 0) & 16 else 8
    )
    if -(-header.size // (cs * l2_entries)) > 0x7FFFFFFF:
        yield _bad(
            f"the disk size {header.size} needs more L1 entries than QEMU allows "
            "(QEMU: 'Image is too big')",
            "size",
        )
    for ext in image.extensions:
        if ext.magic == layout.EXT_BACKING_FORMAT and ext.length >= 16:
            yield Finding(
                "header-invalid",
                f"the backing file format name has {ext.length} bytes, QEMU allows 15",
                offset=ext.field_offset("length"),
                field="length",
            )


def _bitmaps_extension(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    header = image.header
    exts = [e for e in image.extensions if e.magic == layout.EXT_BITMAPS]
    autoclear = AutoclearFeature(header.autoclear_features or 0)
    bit0 = bool(autoclear & AutoclearFeature.BITMAPS)
    if not exts:
        if header.version >= 3 and bit0 and image.extension_error is None:
            yield Finding(
                "bitmaps-autoclear-without-extension",
                "autoclear bit 0 (bitmaps) is set but the image has no bitmaps extension, "
                "which the qcow2 specification calls an error",
                offset=H.autoclear_features,
                field="autoclear_features",
                area="bitmaps",
            )
        return
    for dup in exts[:-1]:
        yield Finding(
            "bitmaps-extension-duplicate",
            f"another bitmaps extension at {exts[-1].offset:#x} follows the one at {dup.offset:#x} "
            "and overrides it for QEMU; "
            "each extension type may appear only once",
            offset=dup.offset,
            field="bitmaps extension",
            area="bitmaps",
        )
    ext = exts[-1]
    if ext.length != layout.BITMAPS_EXTENSION_SIZE:
        yield Finding(
            "bitmaps-extension-length",
            f"the bitmaps extension has length {ext.length}, it must be "
            f"{layout.BITMAPS_EXTENSION_SIZE} (QEMU: 'bitmaps_ext: Invalid extension length')",
            offset=ext.field_offset("length"),
            field="length",
            area="bitmaps",
        )
        return
    c = layout.BitmapsExtension.parse(ext.data)
    ctx.extension = BitmapsExtension.from_container(c, offset=ext.data_offset)
    if header.version < 3:
        ctx.honored = False
        return
    ctx.honored = bit0
