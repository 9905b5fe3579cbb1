"""Header-level findings: feature bits, the extension area, the bitmaps extension's presence.

Sources: qcow2-digest 1.3, 2.1, 3.1, 4.2 and 4.3; QEMU block/qcow2.c
``qcow2_do_open`` and ``qcow2_read_extensions`` (the bitmaps case checks the
length first, then ignores the extension when autoclear bit 0 is clear --
always the case for v2, which has no autoclear field).
"""

from __future__ import annotations

from collections.abc import Iterator

from qbitmap.check import live
from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.format import AutoclearFeature, BitmapsExtension, IncompatibleFeature, layout

KNOWN_INCOMPATIBLE = 0x1F


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    header = image.header
    if ctx.held_locks:
        writer = "writing" if live.writer_present(ctx.held_locks) else "reading"
        yield Finding(
            "image-in-use-live",
            f"another process has the image open for {writer} ({live.describe(ctx.held_locks)}; "
            f"lock bytes {', '.join(map(str, ctx.held_locks))}): what is read may be changing",
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
                offset=72,
                field="incompatible_features",
            )
        if incompat & IncompatibleFeature.CORRUPT:
            yield Finding(
                "image-marked-corrupt",
                "incompatible feature bit 1 (corrupt) is set: QEMU detected metadata damage; "
                "'qemu-img check -r all' may repair it",
                offset=72,
                field="incompatible_features",
            )
        if incompat & IncompatibleFeature.DIRTY:
            yield Finding(
                "image-dirty",
                "incompatible feature bit 0 (dirty) is set: refcounts may lag behind (lazy "
                "refcounts), so they were not compared",
                offset=72,
                field="incompatible_features",
            )
    if image.extension_error is not None:
        err = image.extension_error
        yield Finding(
            "header-extensions-invalid",
            err.reason,
            offset=err.offset,
            field=err.field,
        )
    yield from _bitmaps_extension(ctx)


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
                offset=88,
                field="autoclear_features",
                area="bitmaps",
            )
        return
    for dup in exts[1:]:
        yield Finding(
            "bitmaps-extension-duplicate",
            f"a second bitmaps extension at {dup.offset:#x} follows the one at {exts[0].offset:#x}; "
            "each extension type may appear only once",
            offset=dup.offset,
            field="bitmaps extension",
            area="bitmaps",
        )
    ext = exts[0]
    if ext.length != layout.BitmapsExtension.sizeof():
        yield Finding(
            "bitmaps-extension-length",
            f"the bitmaps extension has length {ext.length}, it must be 24 (QEMU: "
            "'bitmaps_ext: Invalid extension length')",
            offset=ext.offset + 4,
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
