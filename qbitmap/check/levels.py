"""In-use bitmaps and their consistency-level records (man/qbitmap-levels.5).

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

from qbitmap import levels, lockbytes
from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.errors import QbitmapError
from qbitmap.format import (
    AutoclearFeature,
    BitmapEntry,
    Geometry,
    Image,
    IncompatibleFeature,
    LevelRecord,
    layout,
    read_bits,
)
from qbitmap.format.bitmap import dirty_bytes_of
from qbitmap.format.image import LevelsExtension
from qbitmap.units import iec


@dataclass(frozen=True, slots=True)
class Assessment:
    """What a bitmap's consistency-level record is worth."""

    status: str  # "trusted", "stale" or "absent"
    reason: str | None = None  # why stale
    record_offset: int | None = None
    consistent_level: int | None = None
    max_level: int | None = None
    level_bits: int | None = None

    @property
    def trusted(self) -> bool:
        return self.status == "trusted"


def assess(
    image: Image, entries: tuple[BitmapEntry, ...] | list[BitmapEntry]
) -> dict[bytes, Assessment]:
    """Judge the record of every bitmap in *entries* by the spec's trust rules.

    Returns one Assessment per bitmap name; records naming no bitmap are
    reported under their own name with status "stale".
    """
    ext = image.read_levels()
    out: dict[bytes, Assessment] = {e.name: Assessment("absent") for e in entries}
    if ext is None:
        return out
    autoclear = image.header.autoclear
    by_name = {e.name: e for e in entries}
    ext_problem = _extension_problem(ext)
    for record in ext.records:
        reason = ext_problem or _record_problem(image, autoclear, by_name.get(record.name), record)
        out[record.name] = Assessment(
            status="stale" if reason else "trusted",
            reason=reason,
            record_offset=record.offset,
            consistent_level=record.consistent_level,
            max_level=record.max_level,
            level_bits=record.level_bits,
        )
    return out


def _extension_problem(ext: LevelsExtension) -> str | None:
    if ext.version != layout.LEVELS_VERSION:
        return f"the extension has version {ext.version}, qbitmap knows version 1"
    if ext.error is not None:
        return ext.error.reason
    return None


def _record_problem(
    image: Image, autoclear: AutoclearFeature, entry: BitmapEntry | None, record: LevelRecord
) -> str | None:
    if not autoclear & AutoclearFeature.QBITMAP_LEVELS:
        return "autoclear bit 63 is clear: a program that does not maintain the records wrote the image"
    if not autoclear & AutoclearFeature.BITMAPS:
        return "autoclear bit 0 (bitmaps) is clear"
    if entry is None:
        return "no bitmap of that name exists"
    if entry.bitmap_table_offset != record.bitmap_table_offset:
        return (
            f"the record was written for the bitmap table at {record.bitmap_table_offset:#x}, "
            f"the bitmap's table is at {entry.bitmap_table_offset:#x}"
        )
    if entry.granularity_bits != record.granularity_bits:
        return (
            f"the record has granularity_bits {record.granularity_bits}, the bitmap "
            f"{entry.granularity_bits}"
        )
    if not entry.in_use:
        return "the bitmap is not in use, so the record is not needed"
    if not levels.MIN_LEVEL_BITS <= record.level_bits <= levels.MAX_LEVEL_BITS:
        return f"level_bits {record.level_bits} is outside 1..16"
    nbits = -(-image.virtual_size // entry.granularity)
    expected = levels.max_level(nbits, record.level_bits)
    if record.max_level != expected:
        return f"max_level is {record.max_level}, a bitmap of {nbits} bits has {expected}"
    if not -1 <= record.consistent_level <= record.max_level:
        return f"consistent_level {record.consistent_level} is outside -1..{record.max_level}"
    return None


@dataclass(frozen=True, slots=True)
class RecoveryEstimate:
    """What recovering a bitmap from its record would give."""

    granularity: int | None  # guest bytes made dirty per set bit at the record's level
    dirty_bytes: int | None  # guest bytes a level recovery marks dirty (trusted records only)
    on_disk_dirty_bytes: int | None  # guest bytes the stale on-disk bitmap marks dirty


def recovery_granularity(image: Image, entry: BitmapEntry, assessment: Assessment) -> int | None:
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
    assessment: Assessment,
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
    return RecoveryEstimate(gran, dirty_bytes_of(geo, recovered), dirty_bytes_of(geo, bits))


def in_use_finding(
    entry: BitmapEntry,
    assessment: Assessment | None,
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
    if assessment is None:  # records not read (the open scope)
        how = "'qbitmap recover --mode full' or '--reference FILE'"
    elif assessment.trusted:
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


def in_use_findings(ctx: Context) -> Iterator[Finding]:
    """The in-use findings alone, consistency-level records unread (the ``open`` scope)."""
    if not ctx.honored:
        return
    image = ctx.image
    live_writer = lockbytes.writer_present(ctx.held_locks)
    dirty = image.header.version >= 3 and bool(
        image.header.incompatible & IncompatibleFeature.DIRTY
    )
    for entry in ctx.entries:
        if entry.in_use:
            yield in_use_finding(entry, None, None, live_writer=live_writer, dirty=dirty)


def check(
    ctx: Context, sound: set[int]
) -> tuple[list[Finding], dict[int, Assessment], dict[int, RecoveryEstimate | None]]:
    """In-use findings, record findings, and per-bitmap assessments and estimates.

    *sound* holds the directory indices of bitmaps without corruption findings.
    """
    image = ctx.image
    findings: list[Finding] = []
    assessments: dict[int, Assessment] = {}
    estimates: dict[int, RecoveryEstimate | None] = {}
    if not ctx.honored:
        return findings, assessments, estimates
    findings.extend(_extension_findings(ctx))
    by_name = assess(image, ctx.entries)
    names = {e.name for e in ctx.entries}
    live_writer = lockbytes.writer_present(ctx.held_locks)
    dirty = image.header.version >= 3 and bool(
        image.header.incompatible & IncompatibleFeature.DIRTY
    )
    for entry in ctx.entries:
        a = by_name.get(entry.name, Assessment("absent"))
        assessments[entry.index] = a
        est = estimate(image, entry, a, ctx.tables.get(entry.index), sound=entry.index in sound)
        estimates[entry.index] = est
        if entry.in_use:
            findings.append(in_use_finding(entry, a, est, live_writer=live_writer, dirty=dirty))
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
