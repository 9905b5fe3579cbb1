"""Bring in-use bitmaps back into service, in place, crash-safely.

One run of :func:`recover`:

1. **lock and look** -- open a :class:`~qbitmap.store.WriteSession` (QEMU's
   lock bytes held from here to the end; busy => exit 75, nothing written)
   and run :func:`qbitmap.check.check_image` on the locked image.  Corrupt
   metadata outside the bitmaps => refuse (exit 2).  Corrupt bitmap metadata
   => refuse, unless ``drop_broken``.
2. **plan** -- pick the bitmaps (the named ones, or every in-use one) and a
   mode for each: ``full`` (every bit), ``reference`` (on-disk bits OR every
   granule whose guest data differs from the reference), ``level`` (the
   consistency-level record, only when trusted), ``auto`` (level if a
   trusted record exists, else reference if a reference was given, else
   refuse -- a script must ask for ``full`` explicitly).  Compute the new
   bits.  Nothing is written yet; a failure here changes no byte.
3. **stage** -- new data clusters and a new table per bitmap, a new
   directory; all in newly allocated clusters (refcounts written first,
   refcount blocks/table grown as needed).  A crash here: old image, every
   bitmap still in use, new clusters leaked.
4. **commit** -- flush; ONE write of cluster 0 switches the bitmaps extension
   to the new directory (and drops the consistency-level records of the
   recovered bitmaps, clearing autoclear bit 63 when none remain); flush.
   A crash before the write: as in 3.  After the flush: every bitmap
   recovered at once.
5. **release** -- free the old directory and the old tables and data of the
   recovered (and dropped) bitmaps, and leaked clusters found at the start
   (refcount > 0, no reference at all, as ``qemu-img check -r leaks`` would
   free them); flush.  A crash here: recovered bitmaps, old clusters leaked;
   the next run frees them.

With ``dry_run`` the same code runs against an in-memory overlay of the
file, opened read-only: the report's steps are exactly the writes a real
run would make.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qbitmap import levels
from qbitmap.errors import QbitmapError, RefusedError, UsageError
from qbitmap.format import BitmapEntry, BitmapFlag, Geometry, layout, popcount, read_bits
from qbitmap.format.bitmap import geometry_of
from qbitmap.store import (
    Disk,
    Extent,
    WriteSession,
    bitmaps_extension_bytes,
    directory_extent,
    entry_extents,
    levels_extension_bytes,
)

MODES = ("auto", "full", "reference", "level")


class NoModeError(QbitmapError):
    """No recovery mode applies to a bitmap (exit 1): the user must choose one."""


@dataclass
class BitmapResult:
    """What recover did (or would do) to one bitmap."""

    name: str
    action: str  # "recovered", "dropped", "skipped"
    mode: str | None = None
    reason: str | None = None
    granularity: int | None = None
    dirty_bytes_before: int | None = None  # on-disk (stale) contents
    dirty_bytes_after: int | None = None
    old_table_offset: int | None = None
    new_table_offset: int | None = None
    freed_clusters: int = 0
    consistent_level: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecoverReport:
    """The outcome of one run; :meth:`as_dict` is the ``--json`` document."""

    filename: str
    dry_run: bool
    status: str = "nothing-to-do"  # "recovered" | "leaks-reclaimed" | "nothing-to-do" | "dry-run"
    bitmaps: list[BitmapResult] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    leaked_clusters_reclaimed: int = 0
    clusters_allocated: int = 0
    clusters_freed: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "dry_run": self.dry_run,
            "status": self.status,
            "bitmaps": [b.as_dict() for b in self.bitmaps],
            "reference": self.reference,
            "leaked_clusters_reclaimed": self.leaked_clusters_reclaimed,
            "clusters_allocated": self.clusters_allocated,
            "clusters_freed": self.clusters_freed,
            "steps": self.steps,
            "findings": self.findings,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class Options:
    """What the user asked for."""

    names: Sequence[str] = ()
    mode: str = "auto"
    reference: Path | None = None
    reference_format: str | None = None
    drop_broken: bool = False
    dry_run: bool = False
    reclaim_leaks: bool = True


ProgressFactory = Callable[[str, int], Any]


def _corrupt(finding: Any) -> bool:
    from qbitmap.check import Severity

    return bool(finding.severity >= Severity.CORRUPT)


def recover(
    path: str | os.PathLike[str],
    options: Options,
    *,
    progress_factory: ProgressFactory | None = None,
    disk_wrapper: Callable[[Disk], Disk] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RecoverReport:
    """Recover the in-use bitmaps of *path* as *options* say; see the module docstring.

    Raises:
        ImageBusyError: exit 75, nothing written.
        RefusedError: exit 2 (corrupt metadata), nothing written.
        NoModeError: exit 1, nothing written.
        UsageError: exit 64 (unknown bitmap name, bad option combination).
    """
    from qbitmap.check import check_image

    warn = warn or (lambda _msg: None)
    if options.mode not in MODES:
        raise UsageError(f"unknown mode {options.mode!r}; choose one of {', '.join(MODES)}")
    if options.mode == "reference" and options.reference is None:
        raise UsageError("--mode reference needs --reference FILE")
    if options.reference is not None and options.mode in ("full", "level"):
        raise UsageError(f"--reference makes no sense with --mode {options.mode}")
    path = Path(path)
    report = RecoverReport(filename=str(path), dry_run=options.dry_run)
    with WriteSession.open(path, dry_run=options.dry_run, disk_wrapper=disk_wrapper) as session:
        image = session.image
        check = check_image(image, names=list(options.names) or None)
        report.findings = [f.to_dict() for f in check.findings if f.severity > 0]
        image_bad = [f for f in check.findings if _corrupt(f) and f.area == "image"]
        if image_bad:
            raise RefusedError(
                f"{path}: metadata outside the bitmaps is corrupt ({image_bad[0].code}: "
                f"{image_bad[0].message}); repair the image first (qemu-img check -r all)"
            )
        area_bad = [f for f in check.findings if _corrupt(f) and f.area == "bitmaps"]
        bitmap_bad = [f for f in check.findings if _corrupt(f) and f.area == "bitmap"]
        if (area_bad or bitmap_bad) and not options.drop_broken:
            first = (area_bad or bitmap_bad)[0]
            who = f"bitmap {first.bitmap!r}: " if first.bitmap else ""
            raise RefusedError(
                f"{path}: bitmap metadata is corrupt ({who}{first.code}: {first.message}); "
                "--drop-broken removes the broken bitmaps so that QEMU opens the image again"
            )
        plan = _Plan(session, check, options, report, warn)
        if area_bad:
            plan.drop_all(area_bad)
        else:
            plan.select()
            plan.compute(progress_factory)
        plan.find_leaks()
        report.bitmaps = [plan.results[k] for k in sorted(plan.results)]
        if not plan.has_work():
            report.status = "nothing-to-do"
            return report
        plan.apply()
        if options.dry_run:
            report.status = "dry-run"
        elif plan.targets or plan.drop or plan.drop_everything:
            report.status = "recovered"
        else:
            report.status = "leaks-reclaimed"
        report.steps = [step.as_dict() for step in session.journal]
        report.clusters_allocated = sum(e.count for e in session.allocator.allocated)
        report.clusters_freed = sum(e.count for e in session.allocator.freed)
    return report


class _Plan:
    """The work of one run, computed before the first write."""

    def __init__(
        self,
        session: WriteSession,
        check: Any,
        options: Options,
        report: RecoverReport,
        warn: Callable[[str], None],
    ) -> None:
        self.session = session
        self.image = session.image
        self.check = check
        self.options = options
        self.report = report
        self.warn = warn
        directory = self.image.read_directory()
        # autoclear bit 0 clear: QEMU ignores the extension (its bitmaps are lost to it, and a
        # program that did not track writes may have written the image); nothing to recover.
        self.ignored = (
            self.image.bitmaps_extension is not None
            and not (self.image.header.autoclear_features or 0) & 1
        )
        self.entries: list[BitmapEntry] = (
            list(directory.entries) if directory.error is None and not self.ignored else []
        )
        self.directory = directory
        self.targets: dict[int, str] = {}  # entry index -> mode
        self.results: dict[int, BitmapResult] = {}
        self.new_bits: dict[int, np.ndarray] = {}
        self.drop: set[int] = set()
        self.drop_everything = False
        self.leaks: list[tuple[int, int]] = []  # (cluster, decrements)
        self.assessments = levels.assess(self.image, self.entries) if self.entries else {}

    # -- choosing -------------------------------------------------------------------

    def drop_all(self, findings: Sequence[Any]) -> None:
        self.drop_everything = True
        for entry in self.entries or []:
            self.results[entry.index] = BitmapResult(
                entry.display_name, "dropped", reason=findings[0].message
            )
        if not self.entries:
            self.results[-1] = BitmapResult("*", "dropped", reason=findings[0].message)

    def select(self) -> None:
        statuses = {b.entry.index: b for b in self.check.bitmaps if b.entry is not None}
        wanted = set(self.options.names)
        for entry in self.entries:
            status = statuses.get(entry.index)
            if wanted and entry.display_name not in wanted:
                continue
            if status is not None and status.status == "corrupt":
                self.drop.add(entry.index)
                reasons = [
                    f.message
                    for f in self.check.findings
                    if f.bitmap_index == entry.index and _corrupt(f)
                ]
                self.results[entry.index] = BitmapResult(
                    entry.display_name,
                    "dropped",
                    reason=reasons[0] if reasons else "corrupt metadata",
                )
                continue
            if not entry.in_use:
                if wanted:
                    self.results[entry.index] = BitmapResult(
                        entry.display_name,
                        "skipped",
                        reason="not in use: nothing to recover",
                        granularity=entry.granularity,
                    )
                continue
            self.targets[entry.index] = self._mode_for(entry)

    def _mode_for(self, entry: BitmapEntry) -> str:
        mode = self.options.mode
        assessment = self.assessments.get(entry.name)
        trusted = assessment is not None and assessment.trusted
        name = entry.display_name
        if mode == "level" and not trusted:
            why = (
                "no consistency-level record"
                if assessment is None or assessment.status == "absent"
                else (f"its consistency-level record is stale ({assessment.reason})")
            )
            raise NoModeError(
                f"bitmap {name!r}: --mode level needs a trusted consistency-level record, and there is "
                f"{why}; use --reference FILE (exact) or --mode full (every bit)"
            )
        if mode != "auto":
            return mode
        if trusted:
            return "level"
        if self.options.reference is not None:
            return "reference"
        why = (
            "has no consistency-level record"
            if assessment is None or assessment.status == "absent"
            else (f"has a stale consistency-level record ({assessment.reason})")
        )
        raise NoModeError(
            f"bitmap {name!r} {why}; choose how to recover it: --reference FILE (the guest data "
            "as of the last backup: exact), --mode full (every bit set: always correct, the next "
            "incremental backup copies everything), or --mode level (needs a trusted record)"
        )

    # -- computing ---------------------------------------------------------------------

    def compute(self, progress_factory: ProgressFactory | None) -> None:
        if not self.targets:
            return
        from qbitmap.recover.reference import diff_bits, reduce_bits

        by_index = {e.index: e for e in self.entries}
        ref_targets = [i for i, m in self.targets.items() if m == "reference"]
        diff: np.ndarray | None = None
        fine = 0
        if ref_targets:
            assert self.options.reference is not None
            fine = min(by_index[i].granularity for i in ref_targets)
            diff, stats = diff_bits(
                self.image.path,
                self.options.reference,
                virtual_size=self.image.virtual_size,
                granularity=fine,
                reference_format=self.options.reference_format,
                progress_factory=progress_factory,
            )
            if stats.reference_size != self.image.virtual_size:
                self.warn(
                    f"the reference is {stats.reference_size} bytes and the image {self.image.virtual_size}: "
                    "bytes past the shorter end compare as zeros"
                )
            self.report.reference = {"path": str(self.options.reference), **stats.as_dict()}
        for index, mode in self.targets.items():
            entry = by_index[index]
            geo = geometry_of(self.image, entry)
            on_disk = read_bits(self.image, entry)
            before = _dirty_bytes(geo, on_disk)
            level = None
            if mode == "full":
                bits = np.full(geo.nbytes, 0xFF, dtype=np.uint8)
            elif mode == "reference":
                assert diff is not None
                factor = entry.granularity // fine
                fine_nbits = -(-self.image.virtual_size // fine)
                bits = on_disk | reduce_bits(diff, fine_nbits, factor, geo.nbits)
            else:
                a = self.assessments[entry.name]
                assert (
                    a.consistent_level is not None
                    and a.max_level is not None
                    and a.level_bits is not None
                )
                level = a.consistent_level
                bits = levels.recover(
                    on_disk, geo.nbits, a.consistent_level, a.max_level, a.level_bits
                )
            rem = geo.nbits % 8
            if rem and len(bits):
                bits[-1] &= (1 << rem) - 1
            self.new_bits[index] = bits
            self.results[index] = BitmapResult(
                entry.display_name,
                "recovered",
                mode=mode,
                granularity=entry.granularity,
                dirty_bytes_before=before,
                dirty_bytes_after=_dirty_bytes(geo, bits),
                old_table_offset=entry.bitmap_table_offset,
                consistent_level=level,
            )

    def find_leaks(self) -> None:
        """Clusters with a refcount but no reference at all (freed in the release phase)."""
        if not self.options.reclaim_leaks:
            return
        # The check ran on this locked, not yet written image: its map is the one
        # reference_map(self.image) would build again.
        refmap = self.check.reference_map
        if refmap is None:
            from qbitmap.check.clusters import reference_map

            refmap = reference_map(self.image)
        if not refmap.complete:
            return
        alloc = self.session.allocator
        epb = alloc.entries_per_block
        # Entries without a block offset have no refcounts to look at (most of a large table).
        linked = np.flatnonzero(alloc.table & np.uint64(layout.REFT_OFFSET_MASK))
        for table_index in linked.tolist():
            values = alloc._block(table_index)
            if values is None:
                continue
            used = np.flatnonzero(values).astype(np.int64)
            if not len(used):
                continue
            clusters = used + table_index * epb
            refs = refmap.reference_counts(clusters)
            for cluster in clusters[refs == 0].tolist():
                self.leaks.append((cluster, int(values[cluster - table_index * epb])))
        self.report.leaked_clusters_reclaimed = len(self.leaks)

    def has_work(self) -> bool:
        return bool(self.targets or self.drop or self.drop_everything or self.leaks)

    # -- writing ------------------------------------------------------------------------

    def apply(self) -> None:
        session = self.session
        cs = session.cluster_size
        if self.ignored and self.leaks and not (self.targets or self.drop or self.drop_everything):
            # The ignored extension's clusters are among the leaks: drop the extension from the
            # header first, as QEMU does on its next read-write open (qemu-img check -r leaks too).
            session.commit_header(
                extensions={layout.EXT_BITMAPS: None}, what="drop the ignored bitmaps extension"
            )
        by_index = {e.index: e for e in self.entries}
        old_tables = {
            i: self.image.read_bitmap_table(by_index[i]) for i in (*self.targets, *self.drop)
        }
        if self.targets or self.drop or self.drop_everything:
            # Stage: new bitmap data and tables, then the new directory.
            new_entries: list[BitmapEntry] = []
            for entry in self.entries:
                if entry.index in self.drop or self.drop_everything:
                    continue
                if entry.index in self.targets:
                    geo = geometry_of(self.image, entry)
                    written = session.write_bitmap(
                        geo, self.new_bits[entry.index], name=entry.display_name
                    )
                    self.results[entry.index].new_table_offset = written.table_offset
                    entry = dataclasses.replace(
                        entry,
                        bitmap_table_offset=written.table_offset,
                        bitmap_table_size=written.table_size,
                        flags=BitmapFlag(int(entry.flags) & ~int(BitmapFlag.IN_USE)),
                    )
                new_entries.append(entry)
            changes: dict[int, bytes | None] = {}
            autoclear_set = 0
            autoclear_clear = 0
            if new_entries:
                extent, size = session.write_directory(new_entries)
                changes[layout.EXT_BITMAPS] = bitmaps_extension_bytes(
                    len(new_entries), extent.offset, size
                )
                autoclear_set |= 1
            else:
                changes[layout.EXT_BITMAPS] = None
                autoclear_clear |= 1
            self._levels_changes(changes, new_entries)
            if changes.get(layout.EXT_LEVELS, b"") is None:
                autoclear_clear |= 1 << layout.LEVELS_AUTOCLEAR_BIT
            # Commit: one write of cluster 0, flushed before and after.
            session.commit_header(
                extensions=changes,
                autoclear_set=autoclear_set,
                autoclear_clear=autoclear_clear,
                what=_commit_text(self.results),
            )
        # Release: only now is nothing pointing at the old clusters.
        freed: list[tuple[Extent, str]] = []
        if (self.targets or self.drop or self.drop_everything) and self.directory.error is None:
            ext = self.image.bitmaps_extension
            if ext is not None and ext.bitmap_directory_size:
                freed.append(
                    (
                        directory_extent(
                            ext.bitmap_directory_offset, ext.bitmap_directory_size, cs
                        ),
                        "old bitmap directory",
                    )
                )
        for index in self.targets:
            entry = by_index[index]
            extents = entry_extents(entry, old_tables[index], cs)
            self.results[index].freed_clusters = sum(e.count for e in extents)
            freed.extend((e, f"old table/data of bitmap {entry.display_name!r}") for e in extents)
        if self.drop:
            from qbitmap.check.clusters import reference_map

            refmap = reference_map(self.image)
            for index in self.drop:
                entry = by_index[index]
                mine = (
                    refmap.exclusive_clusters(index) if refmap.complete else np.empty(0, np.int64)
                )
                alloc = session.allocator
                own = [int(c) for c in mine.tolist() if alloc.refcount(int(c)) > 0]
                self.results[index].freed_clusters = len(own)
                freed.extend(
                    (Extent(c * cs, 1), f"clusters of dropped bitmap {entry.display_name!r}")
                    for c in own
                )
        for cluster, count in self.leaks:
            for _ in range(count):
                freed.append((Extent(cluster * cs, 1), "leaked cluster"))
        for extent, what in freed:
            session.free([extent], what=what)
        if freed:
            session.flush(what="make the frees durable")

    def _levels_changes(self, changes: dict[int, bytes | None], kept: list[BitmapEntry]) -> None:
        lev = self.image.read_levels()
        if lev is None or lev.error is not None or lev.version != layout.LEVELS_VERSION:
            return
        gone = {e.name for e in self.entries if e.index in self.targets or e.index in self.drop}
        if self.drop_everything:
            gone = {r.name for r in lev.records}
        records = [r for r in lev.records if r.name not in gone]
        if len(records) == len(lev.records):
            return
        changes[layout.EXT_LEVELS] = levels_extension_bytes(records) if records else None


def _dirty_bytes(geo: Geometry, bits: np.ndarray) -> int:
    total = popcount(bits) * geo.granularity
    if geo.nbits and geo.virtual_size % geo.granularity:
        last = geo.nbits - 1
        if bits[last // 8] >> (last % 8) & 1:
            total -= geo.granularity - geo.virtual_size % geo.granularity
    return total


def _commit_text(results: dict[int, BitmapResult]) -> str:
    rec = [r.name for r in results.values() if r.action == "recovered"]
    dropped = [r.name for r in results.values() if r.action == "dropped"]
    parts = []
    if rec:
        parts.append("switch to the new directory: recovered " + ", ".join(repr(n) for n in rec))
    if dropped:
        parts.append("dropped " + ", ".join(repr(n) for n in dropped))
    return "; ".join(parts) or "header"
