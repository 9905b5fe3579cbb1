"""Rules over the reference map: defects, refcounts against references, bitmap clusters.

The map itself -- who references which cluster, and what is wrong with single
references -- is built by :func:`qbitmap.format.references.walk`.  Here it is
judged the way ``qemu-img check`` judges it (block/qcow2-refcount.c
``compare_refcounts``, ``check_refblocks``): a cluster referenced more often
than its refcount says is corruption, a refcount above the references a leak,
a refcount block must be referenced exactly once; and, what QEMU does not say,
which bitmap clusters are shared with something else, unallocated or leaked.

``qbitmap recover`` reads the same map (:func:`qbitmap.format.references.reference_map`)
to learn which clusters it may free and which it must never allocate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from qbitmap.check.context import Context
from qbitmap.check.directory import directory_findings, entry_findings, name_findings
from qbitmap.check.findings import Finding, Severity
from qbitmap.check.tables import entry_problems
from qbitmap.format import BitmapEntry, Image, IncompatibleFeature, layout, unique_sorted
from qbitmap.format.entries import refcounts_as_int64, stored_refcounts_of
from qbitmap.format.model import BitmapStructures
from qbitmap.format.references import (
    BitmapRef,
    Defect,
    DefectKind,
    Kind,
    ReferenceMap,
    bitmap_references,
    open_defects,
    walk,
)

_EMPTY_I64 = np.zeros(0, dtype=np.int64)

# Defect kind (and class prefix) -> finding code.
_DEFECT_CODES = {
    DefectKind.REFCOUNT_TABLE: "refcount-table-invalid",
    DefectKind.REFCOUNT_TABLE_ENTRY: "refcount-block-invalid",
    DefectKind.L1_TABLE: "l1-table-invalid",
    DefectKind.L2_ENTRY: "l2-entry-invalid",
    DefectKind.PAST_EOF: "image-cluster-past-eof",
    DefectKind.SNAPSHOT_TABLE: "snapshot-table-invalid",
    DefectKind.CRYPTO_HEADER: "encryption-header-invalid",
    DefectKind.COPIED_FLAG: "image-copied-flag-mismatch",
}


def _defect_code(defect: Defect) -> str:
    if defect.kind is DefectKind.L1_ENTRY:
        bad_pointer = defect.cls.startswith(("unaligned", "outside"))
        return "l2-table-invalid" if bad_pointer else "l1-entry-invalid"
    return _DEFECT_CODES[defect.kind]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def defect_findings(defects: Iterable[Defect], *, dirty: bool) -> Iterator[Finding]:
    """One finding per class of bad references the walk found."""
    for defect in defects:
        message = defect.reason
        if defect.count > 1:
            message += f" ({defect.count - 1} more like it)"
        if dirty and defect.kind is DefectKind.COPIED_FLAG:
            message += (
                "; the image is marked dirty (lazy refcounts): 'qemu-img check -r all' repairs it"
            )
        yield Finding(_defect_code(defect), message, offset=defect.offset, field=defect.field)


# -- refcounts against references ------------------------------------------------------------


def _kind_word(kind: Kind) -> str:
    return {
        Kind.BITMAP_DIRECTORY: "directory",
        Kind.BITMAP_TABLE: "table",
        Kind.BITMAP_DATA: "data",
    }[kind]


def _owner_text(refmap: ReferenceMap, ref: BitmapRef, names: dict[int, str]) -> str:
    others = [k.phrase for k in refmap.image_kinds_at(ref.cluster)]
    for other in refmap.bitmap_refs_at(ref.cluster):
        if other == ref:
            continue
        if other.kind == Kind.BITMAP_DIRECTORY:
            others.append("the bitmap directory")
        elif other.bitmap == ref.bitmap and other.kind == ref.kind:
            others.append(f"another {_kind_word(other.kind)} reference of the same bitmap")
        else:
            others.append(
                f"the {_kind_word(other.kind)} of bitmap {names.get(other.bitmap, '?')!r}"
            )
    seen: list[str] = []
    for o in others:
        if o not in seen:
            seen.append(o)
    return " and ".join(seen) or "something else"


def bitmap_cluster_findings(refmap: ReferenceMap, entries: list[BitmapEntry]) -> Iterator[Finding]:
    """Overlaps, zero refcounts and leaks of the clusters of bitmap structures."""
    if not len(refmap.bm_clusters):
        return
    names = {e.index: e.display_name for e in entries}
    clusters = refmap.bm_clusters
    total = refmap.reference_counts(clusters)
    stored = refmap.stored_refcounts(clusters)
    if stored is not None:
        rc, inside = stored
    else:
        inside = np.zeros(len(clusters), dtype=bool)
        rc = np.zeros(len(clusters), dtype=np.int64)
    overlap = total > 1
    unallocated = ~overlap & inside & (rc == 0)
    leaked = ~overlap & inside & (rc > total)
    for code, mask in (
        ("bitmap-cluster-overlap", overlap),
        ("bitmap-cluster-unallocated", unallocated),
        ("bitmap-cluster-leaked", leaked),
    ):
        hits = np.flatnonzero(mask)
        if not len(hits):
            continue
        groups: dict[tuple[int, int], list[int]] = {}
        for i in hits.tolist():
            groups.setdefault((int(refmap.bm_index[i]), int(refmap.bm_kinds[i])), []).append(i)
        for (index, kind_value), rows in sorted(groups.items()):
            kind = Kind(kind_value)
            first = min(rows, key=lambda r: (int(refmap.bm_clusters[r]), int(refmap.bm_source[r])))
            ref = refmap.bitmap_ref(first)
            cluster_off = ref.cluster << refmap.cluster_bits
            n = len({int(refmap.bm_clusters[r]) for r in rows})
            owner = (
                "the bitmap directory"
                if index < 0
                else f"the {_kind_word(kind)} of bitmap {names.get(index, '?')!r}"
            )
            one = n == 1
            what = _plural(n, "cluster")
            if code == "bitmap-cluster-overlap":
                msg = (
                    f"{what} of {owner} {'is' if one else 'are'} also used elsewhere: the one at "
                    f"{cluster_off:#x} is also used by {_owner_text(refmap, ref, names)}"
                )
            elif code == "bitmap-cluster-unallocated":
                msg = (
                    f"{what} of {owner} {'has' if one else 'have'} refcount 0 (the first at "
                    f"{cluster_off:#x}), so QEMU may hand them out for other data"
                )
            else:
                msg = (
                    f"{what} of {owner} "
                    f"{'has a refcount above its' if one else 'have a refcount above their'} "
                    f"references (the one at {cluster_off:#x} has {int(rc[first])}, referenced "
                    f"{int(total[first])} time{'' if int(total[first]) == 1 else 's'}); "
                    "'qemu-img check -r leaks' fixes this"
                )
            fld = {
                Kind.BITMAP_DIRECTORY: "bitmap_directory_offset",
                Kind.BITMAP_TABLE: "bitmap_table_offset",
                Kind.BITMAP_DATA: "bitmap table entry",
            }[kind]
            yield Finding(
                code,
                msg,
                offset=ref.source,
                field=fld,
                bitmap=None if index < 0 else names.get(index),
                area="bitmaps" if index < 0 else "bitmap",
                bitmap_index=None if index < 0 else index,
            )


def _kinds_phrase(refmap: ReferenceMap, cluster: int) -> str:
    return " and ".join(k.phrase for k in refmap.image_kinds_at(cluster)) or "nothing"


def image_refcount_findings(
    refmap: ReferenceMap, *, exclude: np.ndarray | None, report_leaks: bool, dirty: bool
) -> Iterator[Finding]:
    """Refcounts against references for every cluster of the file (``compare_refcounts``).

    A refcount below the references of the image's own structures is
    corruption (QEMU could hand the cluster out again); references past
    what the refcount width can count too.  A refcount block must be
    referenced exactly once.  A refcount above all references is a leak (the
    bitmaps' own are reported with the bitmaps).  *exclude*: clusters of an
    ignored bitmaps extension, reported on their own.
    """
    refcounts = refmap.refcounts
    if refcounts is None:
        return
    rc = refcounts_as_int64(refcounts)
    image_refs, bm_refs = refmap.file_reference_counts()
    advice = (
        "; the image is marked dirty (lazy refcounts): 'qemu-img check -r all' repairs the refcounts"
        if dirty
        else "; QEMU could hand them out again"
    )
    low = np.flatnonzero(image_refs > rc)
    if len(low):
        i = int(low[0])
        yield Finding(
            "image-refcount-too-low",
            f"{_plural(len(low), 'cluster')} {'is' if len(low) == 1 else 'are'} referenced more "
            f"often than the refcount says (the one at {i << refmap.cluster_bits:#x} has refcount "
            f"{int(rc[i])} and {int(image_refs[i])} references, as {_kinds_phrase(refmap, i)})"
            + advice,
            offset=i << refmap.cluster_bits,
            field="refcount",
        )
    over = np.flatnonzero(image_refs + bm_refs > refmap.max_refcount)
    if len(over):
        i = int(over[0])
        yield Finding(
            "image-refcount-overflow",
            f"{_plural(len(over), 'cluster')} {'has' if len(over) == 1 else 'have'} more "
            f"references than a refcount of this width can count (the one at "
            f"{i << refmap.cluster_bits:#x} has {int(image_refs[i] + bm_refs[i])}, the largest "
            f"refcount is {refmap.max_refcount})",
            offset=i << refmap.cluster_bits,
            field="refcount",
        )
    blocks = refmap.refcount_blocks
    if len(blocks):
        shared = np.flatnonzero(image_refs[blocks] + bm_refs[blocks] != 1)
        if len(shared):
            k = int(shared[0])
            cluster = int(blocks[k])
            yield Finding(
                "refcount-block-invalid",
                f"the refcount block at {cluster << refmap.cluster_bits:#x} is referenced "
                f"{int(image_refs[cluster] + bm_refs[cluster])} times (as "
                f"{_kinds_phrase(refmap, cluster)}); a refcount block must be used once"
                + ("" if len(shared) == 1 else f" ({len(shared) - 1} more like it)"),
                offset=int(refmap.refcount_block_sources[k]),
                field="refcount table entry",
            )
    if not report_leaks:
        return
    skip = bm_refs > 0
    if exclude is not None and len(exclude):
        skip[exclude[exclude < len(skip)]] = True
    leaked = np.flatnonzero((rc > image_refs) & ~skip)
    if len(leaked):
        i = int(leaked[0])
        yield Finding(
            "image-clusters-leaked",
            f"{_plural(len(leaked), 'cluster')} outside the bitmaps "
            f"{'has a refcount above its' if len(leaked) == 1 else 'have a refcount above their'} "
            f"references (the first at {i << refmap.cluster_bits:#x}); 'qemu-img check -r leaks' "
            "frees them",
            offset=i << refmap.cluster_bits,
            field="refcount",
        )
    yield from _past_eof_leaks(refmap)


def _past_eof_leaks(refmap: ReferenceMap) -> Iterator[Finding]:
    """Refcounts of clusters past the end of the file that nothing references.

    A reference past the end of the file is corruption, reported with the
    structure that holds it; what is left are clusters a writer counted and
    never wrote.  QEMU's check stops at the end of the file, but its
    allocator skips them as the file grows, and they are leaks from then on.
    """
    clusters = refmap.past_eof_clusters
    unreferenced = clusters[refmap.reference_counts(clusters) == 0]
    # Beyond the clusters kept one by one, only the count is known.
    count = len(unreferenced) + refmap.past_eof_total - len(clusters)
    if count <= 0:
        return
    if len(unreferenced):
        first = int(unreferenced[0])
        where = f" (the first at {first << refmap.cluster_bits:#x})"
    else:
        first, where = refmap.file_clusters, ""
    # recover frees what the walk kept one by one (Plan.find_leaks); more than that is not
    # what a killed writer leaves, and it leaves them.
    remedy = (
        "'qbitmap recover' frees them"
        if refmap.past_eof_total == len(clusters)
        else "there are too many for a killed writer's trace, and 'qbitmap recover' leaves them"
    )
    yield Finding(
        "image-clusters-leaked-past-eof",
        f"{_plural(count, 'cluster')} past the end of the file "
        f"{'has' if count == 1 else 'have'} a refcount and no reference{where}: QEMU's check "
        f"does not look past the end of the file, but its allocator skips them as the file "
        f"grows; {remedy}",
        offset=first << refmap.cluster_bits,
        field="refcount",
    )


# -- an extension QEMU ignores ----------------------------------------------------------------


def ignored_bitmaps(
    image: Image, refmap: ReferenceMap
) -> tuple[BitmapStructures | None, list[Finding], np.ndarray, bool]:
    """The bitmaps of an extension QEMU ignores, and whether they can be brought back.

    Returns ``(structures, problems, clusters, recoverable)``: what could be
    read of the directory and tables, findings on them (their structure as
    QEMU would judge it were the extension honoured), the distinct clusters
    they reference, and True when every one of those clusters is still theirs
    alone -- referenced once, by them only, with refcount exactly 1 -- so that
    a recovery can hand them back to QEMU.
    """
    bitmaps = image.bitmap_structures(honored_only=False)
    if bitmaps is None:
        return None, [], _EMPTY_I64, False
    problems: list[Finding] = list(directory_findings(image.read_directory()))
    for entry in bitmaps.entries:
        problems.extend(entry_findings(image, entry))
        table = bitmaps.tables.get(entry.index)
        if table is None:
            problems.append(
                Finding.for_bitmap(
                    entry,
                    "bitmap-table-outside-file",
                    f"bitmap {entry.display_name!r}'s table cannot be read",
                    entry.offset,
                    "bitmap_table_offset",
                )
            )
        else:
            problems.extend(entry_problems(image, entry, table))
    bm = bitmap_references(image, bitmaps)
    clusters = unique_sorted(bm[0])
    recoverable = image.header.version >= 3 and not problems and len(bm[0]) == len(clusters)
    if refmap.refcounts is None:
        recoverable = False
    elif recoverable and len(clusters):
        rc, inside = stored_refcounts_of(refmap.refcounts, clusters)
        others = refmap.reference_counts(clusters)
        recoverable = bool(inside.all() and (rc == 1).all() and (others == 0).all())
    return bitmaps, problems, clusters, recoverable


def _ignored_extension(ctx: Context, refmap: ReferenceMap) -> Iterator[Finding]:
    """Autoclear bit 0 clear (or a v2 image): QEMU ignores the extension and drops it on a write."""
    ext = ctx.extension
    if ext is None or ctx.honored:
        return
    image = ctx.image
    bitmaps, _problems, clusters, recoverable = ignored_bitmaps(image, refmap)
    entries = list(bitmaps.entries) if bitmaps is not None else []
    ctx.ignored = entries
    ctx.ignored_recoverable = recoverable
    ctx.ignored_leaks = clusters
    names = ", ".join(repr(e.display_name) for e in entries[:5]) + (
        ", ..." if len(entries) > 5 else ""
    )
    held = f" ({names})" if entries else ""
    # Names QEMU would refuse once the extension is honoured again: the same rules as for a
    # live extension, so that nothing is brought back that QEMU then refuses.
    refused_names = (
        [f for f in name_findings(entries) if f.severity >= Severity.CORRUPT] if recoverable else []
    )
    if image.header.version < 3:
        yield Finding(
            "bitmaps-extension-v2",
            f"this version 2 image has a bitmaps extension with {_plural(ext.nb_bitmaps, 'bitmap')}"
            f"{held}; QEMU keeps no bitmaps in v2 images, so they are lost to it and it drops "
            "the extension on its next write ('qemu-img check -r leaks' frees its clusters)",
            offset=ext.offset - layout.EXTENSION_HEADER_SIZE,
            field="bitmaps extension",
            area="bitmaps",
        )
    elif recoverable:
        yield Finding(
            "bitmaps-extension-ignored",
            f"autoclear bit 0 is clear, so QEMU ignores the bitmaps extension "
            f"({_plural(ext.nb_bitmaps, 'bitmap')}{held}) and drops it on its next write; its "
            "clusters are still theirs alone, so "
            + (
                "'qbitmap recover --mode full' (or '--reference FILE') can bring the bitmaps "
                "back, and '--drop-broken' drops them"
                if not refused_names
                else f"'qbitmap recover --mode full --drop-broken' (or '--reference FILE "
                f"--drop-broken') can bring the bitmaps back, dropping or renaming the "
                f"{len(refused_names)} {'entry' if len(refused_names) == 1 else 'entries'} whose "
                "names QEMU would refuse; without '--drop-broken' recover refuses"
            ),
            offset=layout.HEADER_FIELD.autoclear_features,
            field="autoclear_features",
            area="bitmaps",
        )
        for found in refused_names:
            # Reported for the extension as a whole: reviving any bitmap revives every name.
            yield dataclasses.replace(
                found,
                message=f"{found.message}; brought back as it is, the extension would make "
                "QEMU refuse the image",
                area="bitmaps",
            )
    else:
        yield Finding(
            "bitmaps-extension-lost",
            f"autoclear bit 0 is clear, so QEMU ignores the bitmaps extension "
            f"({_plural(ext.nb_bitmaps, 'bitmap')}{held}), and its structures are damaged or "
            "their clusters are no longer theirs alone, so they cannot be brought back; "
            "'qbitmap recover --drop-broken' drops the extension",
            offset=layout.HEADER_FIELD.autoclear_features,
            field="autoclear_features",
            area="bitmaps",
        )
    for entry in entries:
        yield Finding(
            "bitmap-ignored",
            f"bitmap {entry.display_name!r} is lost to QEMU while its extension is ignored"
            + (
                ": recover it (every bit it marks is then stale) or take a full backup"
                if recoverable
                else ": take a full backup and create it again"
            ),
            offset=entry.offset,
            field="bitmap directory entry",
            bitmap=entry.display_name,
            area="bitmaps",
        )


def open_check(ctx: Context) -> Iterator[Finding]:
    """The ``open`` scope: where QEMU's open finds the image's tables, no table walked.

    The bitmaps of an extension QEMU ignores are listed (as ``ignored``)
    without judging whether recover could bring them back: that needs the
    reference map.
    """
    yield from defect_findings(open_defects(ctx.image), dirty=False)
    if ctx.extension is not None and not ctx.honored:
        bitmaps = ctx.image.bitmap_structures(honored_only=False)
        ctx.ignored = list(bitmaps.entries) if bitmaps is not None else []


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    ext = ctx.extension
    bitmaps = None
    if ext is not None and ctx.honored and ctx.directory_readable:
        bitmaps = BitmapStructures(
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            ext.field_offset("bitmap_directory_offset"),
            ctx.entries,
            ctx.tables,
        )
    refmap = walk(image, bitmaps)
    ctx.refmap = refmap
    header = image.header
    dirty = header.version >= 3 and bool(
        (header.incompatible_features or 0) & IncompatibleFeature.DIRTY
    )
    yield from defect_findings(refmap.defects, dirty=dirty)
    yield from bitmap_cluster_findings(refmap, ctx.entries)
    yield from _ignored_extension(ctx, refmap)
    unparsed = ext is None and image.extension(layout.EXT_BITMAPS) is not None
    bitmaps_walked = not unparsed and (
        (ext is None or not ctx.honored)
        or (ctx.directory_complete and all(e.index in ctx.tables for e in ctx.entries))
    )
    yield from image_refcount_findings(
        refmap,
        exclude=ctx.ignored_leaks,
        report_leaks=refmap.complete and bitmaps_walked and image.extension_error is None,
        dirty=dirty,
    )
