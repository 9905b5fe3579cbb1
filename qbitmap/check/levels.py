"""In-use bitmaps and their consistency-level records (shared/spec/consistency-levels.md).

A bitmap left ``in_use`` is not corruption: its metadata is sound but its
contents are stale.  For each one we say what can be done, which depends on
its record: trusted (``qbitmap recover --mode level`` is possible), stale (and
why) or absent.  For a trusted record we also work out what a level recovery
would cost: apply :func:`qbitmap.levels.recover` to the on-disk bits and count
the bytes it marks dirty.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qbitmap import levels
from qbitmap.check import live
from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.errors import QbitmapError
from qbitmap.format import (
    BitmapEntry,
    Geometry,
    Image,
    IncompatibleFeature,
    popcount,
    read_bits,
)
from qbitmap.units import iec


@dataclass(frozen=True, slots=True)
class RecoveryEstimate:
    """What recovering a bitmap from its record would give."""

    granularity: int | None  # guest bytes made dirty per set bit at the record's level
    dirty_bytes: int | None  # guest bytes a level recovery marks dirty (trusted records only)
    on_disk_dirty_bytes: int | None  # guest bytes the stale on-disk bitmap marks dirty


def _dirty_bytes(bits: np.ndarray, geo: Geometry) -> int:
    """Guest bytes covered by the set bits of *bits*, clipped to the disk's end."""
    total = popcount(bits) * geo.granularity
    last = geo.nbits - 1
    if geo.nbits and geo.virtual_size % geo.granularity and bits[last // 8] >> (last % 8) & 1:
        total -= geo.granularity - geo.virtual_size % geo.granularity
    return total


def recovery_granularity(
    image: Image, entry: BitmapEntry, assessment: levels.Assessment
) -> int | None:
    c, m, lb = assessment.consistent_level, assessment.max_level, assessment.level_bits
    if c is None or m is None or lb is None:
        return None
    if not levels.MIN_LEVEL_BITS <= lb <= levels.MAX_LEVEL_BITS or not -1 <= c <= m:
        return None
    if c < 0:
        return image.virtual_size
    return levels.group_bits(c, m, lb) * entry.granularity


def estimate(
    image: Image,
    entry: BitmapEntry,
    assessment: levels.Assessment,
    table: np.ndarray | None,
    *,
    sound: bool,
) -> RecoveryEstimate | None:
    """Granularity and dirty bytes of a level recovery, when the record allows one."""
    if assessment.status == "absent":
        return None
    gran = recovery_granularity(image, entry, assessment)
    if not (assessment.trusted and sound and table is not None and entry.granularity_valid):
        return RecoveryEstimate(gran, None, None)
    geo = Geometry(image.virtual_size, entry.granularity, image.cluster_size)
    if len(table) != geo.table_size:
        return RecoveryEstimate(gran, None, None)
    assert assessment.consistent_level is not None and assessment.max_level is not None
    assert assessment.level_bits is not None
    try:
        bits = read_bits(image, entry, table)
    except QbitmapError:
        return RecoveryEstimate(gran, None, None)
    recovered = levels.recover(
        bits, geo.nbits, assessment.consistent_level, assessment.max_level, assessment.level_bits
    )
    return RecoveryEstimate(gran, _dirty_bytes(recovered, geo), _dirty_bytes(bits, geo))


def in_use_finding(
    entry: BitmapEntry,
    assessment: levels.Assessment,
    est: RecoveryEstimate | None,
    *,
    live_writer: bool,
    dirty: bool = False,
) -> Finding:
    name = entry.display_name
    common = {
        "offset": entry.field_offset("flags"),
        "field": "flags",
        "bitmap": name,
        "area": "bitmap",
        "bitmap_index": entry.index,
    }
    if live_writer:
        return Finding(
            "bitmap-in-use-live",
            f"bitmap {name!r} is in use by the process that has the image open for writing, "
            "as expected while it runs; its on-disk contents are stale until that process closes it",
            **common,  # type: ignore[arg-type]
        )
    if assessment.trusted:
        cost = ""
        if est is not None and est.dirty_bytes is not None:
            cost = f", marks {iec(est.dirty_bytes)} dirty"
        how = (
            f"'qbitmap recover --mode level' (trusted record: level {assessment.consistent_level} of "
            f"{assessment.max_level}{cost}), '--mode full' or '--reference FILE'"
        )
    elif assessment.status == "stale":
        how = (
            f"'qbitmap recover --mode full' or '--reference FILE' (its consistency-level record is "
            f"stale: {assessment.reason})"
        )
    else:
        how = "'qbitmap recover --mode full' or '--reference FILE' (it has no consistency-level record)"
    if dirty:
        how = (
            "'qemu-img check -r all' first (the image is marked dirty: lazy refcounts left its "
            f"refcounts to be repaired, and recover writes only into a clean image), then {how}"
        )
    return Finding(
        "bitmap-in-use",
        f"bitmap {name!r} was left in use by a writer that stopped without closing it, so its "
        f"contents are stale; recover it with {how}",
        **common,  # type: ignore[arg-type]
    )


def check(
    ctx: Context, sound: set[int]
) -> tuple[list[Finding], dict[int, levels.Assessment], dict[int, RecoveryEstimate | None]]:
    """In-use findings, record findings, and per-bitmap assessments and estimates.

    *sound* holds the directory indices of bitmaps without corruption findings.
    """
    image = ctx.image
    findings: list[Finding] = []
    assessments: dict[int, levels.Assessment] = {}
    estimates: dict[int, RecoveryEstimate | None] = {}
    if not ctx.honored:
        return findings, assessments, estimates
    findings.extend(_extension_findings(ctx))
    by_name = levels.assess(image, ctx.entries)
    names = {e.name for e in ctx.entries}
    live_writer = live.writer_present(ctx.held_locks)
    dirty = image.header.version >= 3 and bool(
        image.header.incompatible & IncompatibleFeature.DIRTY
    )
    for entry in ctx.entries:
        a = by_name.get(entry.name, levels.Assessment("absent"))
        assessments[entry.index] = a
        est = estimate(image, entry, a, ctx.tables.get(entry.index), sound=entry.index in sound)
        estimates[entry.index] = est
        if entry.in_use:
            findings.append(
                in_use_finding(entry, a, est, live_writer=live_writer, dirty=dirty)
            )
        if a.status == "stale":
            findings.append(
                Finding(
                    "levels-record-stale",
                    f"the consistency-level record of bitmap {entry.display_name!r} may not be "
                    f"trusted: {a.reason}",
                    offset=a.record_offset,
                    field="qbitmap levels record",
                    bitmap=entry.display_name,
                    area="bitmap",
                    bitmap_index=entry.index,
                )
            )
    for name, a in by_name.items():
        if name not in names:
            findings.append(
                Finding(
                    "levels-record-orphan",
                    f"a consistency-level record names bitmap "
                    f"{name.decode('utf-8', 'backslashreplace')!r}, which the image does not have",
                    offset=a.record_offset,
                    field="qbitmap levels record",
                )
            )
    return findings, assessments, estimates


def _extension_findings(ctx: Context) -> Iterator[Finding]:
    ext = ctx.image.read_levels()
    if ext is None:
        return
    from qbitmap.format import layout

    if ext.version != layout.LEVELS_VERSION:
        yield Finding(
            "levels-extension-invalid",
            f"the consistency-level extension has version {ext.version}, qbitmap knows version 1",
            offset=ext.offset,
            field="version",
        )
    elif ext.error is not None:
        yield Finding(
            "levels-extension-invalid",
            f"the consistency-level extension cannot be parsed: {ext.error.reason}",
            offset=ext.error.offset,
            field=ext.error.field,
        )
