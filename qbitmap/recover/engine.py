"""Bring stale bitmaps back into service, in place, crash-safely -- or refuse and change nothing.

One run of :func:`recover`:

1. **lock and look** -- open a :class:`~qbitmap.store.WriteSession` (QEMU's
   lock bytes held from here to the end; busy => exit 75, nothing written)
   and run :func:`qbitmap.check.check_image` on the locked image (with a
   reference, the comparison is opened first and the kernel asked for the
   first bytes it reads, so that the storage works while the check runs).
   Anything wrong outside the bitmaps -- a table QEMU refuses, a bad L1/L2 entry, a
   reference past the end of the file, a refcount below its references, a
   COPIED flag out of step -- => refuse (exit 2): a writer that trusted those
   refcounts could hand out a cluster something still uses.  Corrupt bitmap
   metadata => refuse, unless ``drop_broken``.
2. **plan** -- pick the bitmaps (the named ones, or every stale one) and a
   mode for each: ``full`` (every bit), ``reference`` (on-disk bits OR every
   granule whose guest data differs from the reference), ``level`` (the
   consistency-level record, only when trusted), ``auto`` (level if a trusted
   record exists, else reference if a reference was given, else refuse -- a
   script must ask for ``full`` explicitly).  Stale means in use, or in an
   extension QEMU ignores (autoclear bit 0 clear) whose clusters are still the
   bitmaps' alone.  With ``drop_broken``, bitmaps QEMU cannot load are dropped
   and bitmaps QEMU loads whose clusters are damaged are rewritten with every
   bit set.  Compute the new bits.  Nothing is written yet: a refusal or a
   failure here changes no byte.
3. **stage** -- new data clusters and a new table per bitmap, a new
   directory; all in newly allocated clusters (refcounts written first,
   refcount blocks/table grown as needed), never in a cluster anything
   references.  A crash here: old image, every bitmap still stale, new
   clusters leaked.
4. **commit** -- flush; ONE write of cluster 0 switches the bitmaps extension
   to the new directory (and sets autoclear bit 0, and drops the
   consistency-level records of the recovered bitmaps, clearing autoclear bit
   63 when none remain); flush.  A crash before the write: as in 3.  After the
   flush: every bitmap recovered at once.
5. **release** -- drop the references the commit removed: the old directory,
   the old tables and data of the recovered and dropped bitmaps.  A cluster's
   refcount never falls below the references that remain to it, so a cluster
   also used by something else is never freed.  Then leaked clusters found at
   the start (refcount > 0, nothing references them, as ``qemu-img check -r
   leaks`` would free them) are freed; flush.  A crash here: recovered
   bitmaps, old clusters leaked; the next run frees them.

The same run can also add bitmaps (``Options.create``: recording, every
bit set, or every granule that differs from the reference) and re-enable
disabled ones (``Options.enable``: every bit set and the ``auto`` flag), as
``qbitmap checkpoints --repair`` needs for libvirt's checkpoints: they are
more targets of the plan, staged with the recovered bitmaps, switched in by
the same one header write, and refused by the same rules (and when QEMU
ignores the extension, a name exists, or a bitmap breaks QEMU's limits).

With ``dry_run`` the same code runs against an in-memory overlay of the
file, opened read-only: the report's steps are exactly the writes a real
run would make.  :func:`prepare` stops after step 2, with the image still
locked: a caller preparing several images writes none unless all agree.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qbitmap import levels
from qbitmap.check import REPAIRS, CheckReport, Finding, Severity, check_image
from qbitmap.check.directory import loads_past_eof
from qbitmap.errors import NoModeError, QbitmapError, RefusedError, UsageError
from qbitmap.format import BitmapEntry, BitmapFlag, Geometry, layout, read_bits
from qbitmap.format.bitmap import dirty_bytes_of, geometry_of
from qbitmap.format.model import BitmapStructures
from qbitmap.format.references import ReferenceMap, bitmap_references, walk
from qbitmap.recover.modes import MODES
from qbitmap.store import (
    Disk,
    Extent,
    WriteSession,
    bitmaps_extension_bytes,
    levels_extension_bytes,
)

if TYPE_CHECKING:
    from qbitmap.recover.reference import Comparison


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecoverReport:
    """The outcome of one run; :meth:`to_dict` is the ``--json`` document."""

    filename: str
    dry_run: bool
    status: str = "nothing-to-do"  # "recovered" | "leaks-reclaimed" | "nothing-to-do" | "dry-run"
    bitmaps: list[BitmapResult] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    leaked_clusters_reclaimed: int = 0
    clusters_allocated: int = 0
    clusters_freed: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)
    # Every write issued to the file, (offset, length), in order: with --dry-run the ones
    # a real run would issue.
    writes: list[tuple[int, int]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "dry_run": self.dry_run,
            "status": self.status,
            "bitmaps": [b.to_dict() for b in self.bitmaps],
            "reference": self.reference,
            "leaked_clusters_reclaimed": self.leaked_clusters_reclaimed,
            "clusters_allocated": self.clusters_allocated,
            "clusters_freed": self.clusters_freed,
            "steps": self.steps,
            "writes": [list(w) for w in self.writes],
            "findings": self.findings,
            "exit_code": self.exit_code,
        }


@dataclass(frozen=True)
class NewBitmap:
    """A bitmap to add to the image: recording (``auto``), with every change marked.

    *mode* ``full`` sets every bit; ``reference`` sets every granule whose
    guest data differs from :attr:`Options.reference`, which must then hold
    the guest data as of the moment the bitmap stands for (its checkpoint).
    """

    name: str
    granularity: int  # bytes per bit: a power of two, 512 B to 2 GiB
    mode: str = "full"  # "full" or "reference"


@dataclass(frozen=True)
class Options:
    """What the user asked for.

    Without *create* and *enable*, the run recovers the stale bitmaps named in
    *names* (every stale one when *names* is empty), as ``qbitmap recover``
    does.  With *create* or *enable*, the run does exactly what they and
    *names* list: the bitmaps of *create* are added, those of *enable* get
    every bit set and the ``auto`` flag (in use or not), and the in-use
    bitmaps of *names* are recovered by *mode* -- all switched in one commit.
    """

    names: Sequence[str] = ()
    mode: str = "auto"
    reference: Path | None = None
    reference_format: str | None = None
    drop_broken: bool = False
    dry_run: bool = False
    reclaim_leaks: bool = True
    create: Sequence[NewBitmap] = ()
    enable: Sequence[str] = ()

    @property
    def explicit(self) -> bool:
        """The run does what *names*, *create* and *enable* list, and nothing else."""
        return bool(self.create or self.enable)


ProgressFactory = Callable[[str, int], Any]


def _refusing(finding: Finding) -> bool:
    """Findings that stop a writer: corruption, or a structure the check could not read."""
    return finding.severity in (Severity.CORRUPT, Severity.FAILED)


def _validate(options: Options) -> None:
    if options.mode not in MODES:
        raise UsageError(f"unknown mode {options.mode!r}; choose one of {', '.join(MODES)}")
    if options.mode == "reference" and options.reference is None:
        raise UsageError("--mode reference needs --reference FILE")
    creating_from_reference = any(b.mode == "reference" for b in options.create)
    if (
        options.reference is not None
        and options.mode in ("full", "level")
        and not creating_from_reference
    ):
        raise UsageError(f"--reference makes no sense with --mode {options.mode}")
    if creating_from_reference and options.reference is None:
        raise UsageError("a bitmap created from a reference needs a reference FILE")
    if options.explicit and options.drop_broken:
        raise UsageError("creating or enabling bitmaps cannot be combined with --drop-broken")
    names = [b.name for b in options.create]
    if len(set(names)) != len(names):
        raise UsageError(f"bitmap {names[0]!r} is to be created twice")
    for new in options.create:
        _validate_new_bitmap(new)


def _validate_new_bitmap(new: NewBitmap) -> None:
    """QEMU's limits on a new bitmap (block/qcow2-bitmap.c check_constraints_on_bitmap)."""
    raw = new.name.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > layout.BME_MAX_NAME_SIZE or b"\0" in raw:
        raise UsageError(
            f"bitmap name {new.name!r}: a name is 1 to {layout.BME_MAX_NAME_SIZE} bytes without "
            "a NUL byte"
        )
    g = new.granularity
    low, high = 1 << layout.BME_MIN_GRANULARITY_BITS, 1 << layout.BME_MAX_GRANULARITY_BITS
    if g & (g - 1) or not low <= g <= high:
        raise UsageError(
            f"bitmap {new.name!r}: granularity {g} is not a power of two from {low} to {high}"
        )
    if new.mode not in ("full", "reference"):
        raise UsageError(f"bitmap {new.name!r}: a new bitmap is made full or from a reference")


class Recovery:
    """A run decided and computed on a locked image, nothing written yet.

    :meth:`apply` writes it (stage, commit, release) and returns the report;
    leaving the :func:`prepare` block without it writes nothing.  Several
    can be prepared at once (every image locked) and applied only when none
    was refused.
    """

    def __init__(self, session: WriteSession, plan: _Plan, report: RecoverReport) -> None:
        self.session = session
        self.plan = plan
        self.report = report
        self.applied = False

    @property
    def path(self) -> Path:
        return self.session.path

    def has_work(self) -> bool:
        return self.plan.has_work()

    def apply(self) -> RecoverReport:
        """Write what was planned (or, for a dry run, into the overlay); once."""
        if self.applied:
            raise RuntimeError("a recovery is applied once")
        self.applied = True
        plan, report, session = self.plan, self.report, self.session
        if not plan.has_work():
            report.status = "nothing-to-do"
            return report
        plan.apply()
        if report.dry_run:
            report.status = "dry-run"
        elif plan.changes_bitmaps():
            report.status = "recovered"
        else:
            report.status = "leaks-reclaimed"
        report.steps = [step.to_dict() for step in session.journal]
        report.writes = list(session.write_log)
        report.clusters_allocated = sum(e.count for e in session.allocator.allocated)
        report.clusters_freed = sum(e.count for e in session.allocator.freed)
        return report


@contextmanager
def prepare(
    path: str | os.PathLike[str],
    options: Options,
    *,
    progress_factory: ProgressFactory | None = None,
    disk_wrapper: Callable[[Disk], Disk] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[Recovery]:
    """Lock *path*, check it, decide and compute the run; yield it unwritten.

    Everything that refuses does so here, before any write, with the
    exceptions :func:`recover` lists; the image stays locked until the block
    ends.
    """
    warn = warn or (lambda _msg: None)
    _validate(options)
    path = Path(path)
    if options.reference is not None:
        from qbitmap.recover.reference import validate_reference

        validate_reference(path, options.reference, reference_format=options.reference_format)
    report = RecoverReport(filename=str(path), dry_run=options.dry_run)
    with (
        WriteSession.open(path, dry_run=options.dry_run, disk_wrapper=disk_wrapper) as session,
        ExitStack() as stack,
    ):
        early = _start_comparison(session, options)
        if early is not None:
            stack.enter_context(early)
        names = None if options.explicit else (list(options.names) or None)
        check = check_image(session.image, names=names)
        report.findings = [f.to_dict() for f in check.findings if f.severity > 0]
        plan = _Plan(session, check, options, report, warn)
        plan.decide()
        plan.compute(progress_factory, early)
        stack.close()  # the comparison's files: the check and the plan are done with them
        plan.find_leaks()
        report.bitmaps = [plan.results[k] for k in sorted(plan.results)] + plan.created
        yield Recovery(session, plan, report)


def _start_comparison(session: WriteSession, options: Options) -> Comparison | None:
    """The reference comparison, its first reads already asked for; None without a reference.

    Opened under the write lock, before the check runs, so that the storage
    reads both files' data while the check and the plan take their time.
    Only a head start: if the plan picks no reference mode, it is closed
    unused (what it cost: the page cache of both heads and one read-ahead window);
    if opening fails, the comparison proper opens the files again and
    meets the error where it always has, after the check.
    """
    if options.reference is None:
        return None
    from qbitmap.recover.reference import Comparison

    try:
        comparison = Comparison(
            session.image.path,
            options.reference,
            virtual_size=session.image.virtual_size,
            reference_format=options.reference_format,
        )
    except Exception:  # noqa: BLE001 - met again, and reported, by the comparison proper
        return None
    try:
        comparison.start()
    except Exception:  # noqa: BLE001 - as above
        comparison.close()
        return None
    return comparison


def recover(
    path: str | os.PathLike[str],
    options: Options,
    *,
    progress_factory: ProgressFactory | None = None,
    disk_wrapper: Callable[[Disk], Disk] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RecoverReport:
    """Recover the stale bitmaps of *path* as *options* say; see the module docstring.

    Raises:
        ImageBusyError: exit 75, nothing written.
        RefusedError: exit 2 (corrupt metadata), nothing written.
        NoModeError: exit 1, nothing written.
        UsageError: exit 64 (unknown bitmap name, bad option combination, a
            reference that is the image itself, a bitmap to create that
            exists or breaks QEMU's constraints), nothing written.
    """
    with prepare(
        path, options, progress_factory=progress_factory, disk_wrapper=disk_wrapper, warn=warn
    ) as recovery:
        return recovery.apply()


class _Plan:
    """The work of one run, decided and computed before the first write."""

    def __init__(
        self,
        session: WriteSession,
        check: CheckReport,
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
        self.codes = {f.code for f in check.findings}
        header = self.image.header
        extension_present = self.image.extension(layout.EXT_BITMAPS) is not None
        # autoclear bit 0 clear (or a v2 image): QEMU ignores the extension.
        self.ignored = extension_present and (
            header.version < 3 or not (header.autoclear_features or 0) & 1
        )
        # Every bitmap structure the image has, honoured or not: what the release phase
        # drops references of, and what the allocator must never hand out.
        self.structures: BitmapStructures | None = self.image.bitmap_structures(honored_only=False)
        self.entries: list[BitmapEntry] = list(self.structures.entries) if self.structures else []
        self.statuses = {b.entry.index: b for b in check.bitmaps if b.entry is not None}
        self.targets: dict[int, str] = {}  # entry index -> mode
        self.stale_kept: set[int] = set()  # ignored bitmaps kept as in use (not selected)
        self.results: dict[int, BitmapResult] = {}
        self.new_bits: dict[int, np.ndarray] = {}
        self.drop: set[int] = set()
        self.drop_everything = False
        self.rewrite_directory = False  # the directory's clusters are damaged: write a new one
        self.renames: set[int] = set()  # entries QEMU cannot store back: cut at the NUL byte
        self.leaks: list[tuple[int, int]] = []  # (cluster, decrements)
        self.enabling: set[int] = set()  # targets that also get the auto flag
        self.creations: list[NewBitmap] = list(options.create)
        self.created: list[BitmapResult] = []  # one per creation, in order
        self.created_bits: list[np.ndarray] = []
        # The consistency-level records as check judged them (assessed once, by check).
        self.assessments = {
            b.entry.name: b.levels
            for b in check.bitmaps
            if b.entry is not None and b.levels is not None
        }
        self._refmap: ReferenceMap | None = None

    # -- deciding -------------------------------------------------------------------

    def refmap(self) -> ReferenceMap:
        """Every reference of the image, bitmaps of an ignored extension included."""
        if self._refmap is None:
            kept = self.check.reference_map
            self._refmap = (
                kept if kept is not None and not self.ignored else walk(self.image, self.structures)
            )
        return self._refmap

    def decide(self) -> None:
        """Refuse, or choose what happens to each bitmap; raises before any write."""
        path = self.image.path
        findings = self.check.findings
        image_bad = [f for f in findings if _refusing(f) and f.area == "image"]
        if image_bad:
            first = image_bad[0]
            raise RefusedError(
                f"{path}: metadata outside the bitmaps is unsound ({first.code}: "
                f"{first.message}); recover writes nothing into such an image: repair it first "
                "(qemu-img check -r all)"
            )
        if self.ignored:
            if self.options.explicit:
                raise RefusedError(
                    f"{path}: autoclear bit 0 is clear, so QEMU ignores the bitmaps extension; "
                    "no bitmap can be added or enabled before its bitmaps are brought back "
                    "(qbitmap recover --mode full) or dropped (--drop-broken)"
                )
            self._decide_ignored()
            return
        if self.options.explicit:
            self._decide_explicit()
        area_bad = [
            f for f in findings if _refusing(f) and f.area == "bitmaps" and f.code not in REPAIRS
        ]
        cut_short = [f.code for f in area_bad] == ["bitmap-directory-outside-file"]
        if cut_short and loads_past_eof(self.image):
            self._refuse_cut_short()
        bitmap_bad = [f for f in findings if _refusing(f) and f.area == "bitmap"]
        repairable = all(f.code in REPAIRS for f in bitmap_bad)
        if (area_bad or bitmap_bad) and not self.options.drop_broken:
            first = (area_bad or bitmap_bad)[0]
            who = f"bitmap {first.bitmap!r}: " if first.bitmap else ""
            if repairable and not area_bad:
                remedy = "--drop-broken repairs those bitmaps (QEMU still loads them)"
            elif first.code == "bitmap-disk-size-zero":
                remedy = "no mode can bring it back; --drop-broken drops it"
            else:
                remedy = (
                    "--drop-broken removes the bitmaps QEMU cannot load, so that it opens the "
                    "image again"
                )
            raise RefusedError(
                f"{path}: bitmap metadata is corrupt ({who}{first.code}: {first.message}); "
                + remedy
            )
        if area_bad:
            self._drop_all(area_bad[0].message)
            return
        self.rewrite_directory = any(
            _refusing(f) and f.area == "bitmaps" and f.code in REPAIRS for f in findings
        )
        self._select()

    def _refuse_cut_short(self) -> None:
        """The directory runs past the end of the file, and QEMU loads it all the same."""
        ext = self.image.bitmaps_extension
        assert ext is not None
        end = ext.bitmap_directory_offset + ext.bitmap_directory_size
        raise RefusedError(
            f"{self.image.path}: the bitmap directory ({ext.bitmap_directory_size} bytes at "
            f"{ext.bitmap_directory_offset:#x}) is cut short by the end of the file "
            f"({self.image.file_size} bytes); QEMU reads the missing bytes as zeros and loads "
            "every bitmap, so recover writes nothing (and --drop-broken drops none of them); "
            f"extending the file with zeros to {end} bytes changes nothing QEMU reads and makes "
            "the directory whole"
        )

    def _decide_explicit(self) -> None:
        """Names to recover, enable and create: known, new, and room for them; before a write."""
        path = self.image.path
        options = self.options
        for name in [*options.names, *options.enable]:
            if not any(e.named(name) for e in self.entries):
                raise UsageError(f"{path}: no bitmap named {name!r}")
        if self.creations and self.image.virtual_size == 0:
            # check_dir_entry refuses a table of 0 entries, the only size for a disk of 0 bytes.
            raise RefusedError(
                f"{path}: the disk is 0 bytes long, and QEMU accepts no bitmap table for such a "
                f"disk: bitmap {self.creations[0].name!r} cannot be created"
            )
        for new in self.creations:
            if any(e.named(new.name) for e in self.entries):
                raise UsageError(f"{path}: a bitmap named {new.name!r} already exists")
            geo = Geometry(self.image.virtual_size, new.granularity, self.image.cluster_size)
            if geo.table_size > layout.BME_MAX_TABLE_SIZE or geo.nbytes > layout.BME_MAX_PHYS_SIZE:
                raise UsageError(
                    f"{path}: bitmap {new.name!r} with granularity {new.granularity} would take "
                    "more space than QEMU allows: use a larger granularity"
                )
        if not self.creations:
            return
        count = len(self.entries) + len(self.creations)
        size = sum(e.size for e in self.entries) + sum(
            layout.dir_entry_size(len(n.name.encode("utf-8", "surrogateescape")), 0)
            for n in self.creations
        )
        if count > layout.QCOW2_MAX_BITMAPS or size > layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise RefusedError(
                f"{path}: {count} bitmaps ({size} directory bytes) exceed QEMU's limits of "
                f"{layout.QCOW2_MAX_BITMAPS} bitmaps and {layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE} "
                "directory bytes"
            )
        if self.image.extension(layout.EXT_BITMAPS) is None:
            # The first cluster must have room for a new extension: known before any write.
            self.session.build_cluster0(
                extensions={layout.EXT_BITMAPS: bitmaps_extension_bytes(count, 0, size)}
            )

    def _decide_ignored(self) -> None:
        path = self.image.path
        options = self.options
        revivable = "bitmaps-extension-ignored" in self.codes and bool(self.entries)
        reviving_mode = options.mode in ("full", "reference") or (
            options.mode == "auto" and options.reference is not None
        )
        if options.mode == "level":
            raise NoModeError(
                f"{path}: autoclear bit 0 is clear, so the consistency-level records cannot be "
                "trusted; use --mode full or --reference FILE to bring the bitmaps back, or "
                "--drop-broken to drop them"
            )
        if revivable and reviving_mode:
            refused_names = [
                f
                for f in self.check.findings
                if _refusing(f) and f.area == "bitmaps" and f.bitmap_index is not None
            ]
            if refused_names and not options.drop_broken:
                first = refused_names[0]
                raise RefusedError(
                    f"{path}: autoclear bit 0 is clear, so QEMU ignores the bitmaps extension, "
                    f"and some of its names break QEMU's rules ({first.code}: {first.message}); "
                    "--drop-broken brings the bitmaps back "
                    "and drops or renames the entries whose names QEMU refuses"
                )
            self._select(ignored=True)
            return
        if options.drop_broken:
            self._drop_all("QEMU ignores the bitmaps extension (autoclear bit 0 is clear)")
            return
        if not revivable:
            raise RefusedError(
                f"{path}: autoclear bit 0 is clear, so QEMU ignores the bitmaps extension, and "
                "its bitmaps cannot be brought back (their structures are damaged or their "
                "clusters are no longer theirs alone); --drop-broken drops them"
            )
        raise NoModeError(
            f"{path}: autoclear bit 0 is clear, so QEMU ignores the bitmaps extension and "
            "every bitmap in it is stale; choose how to bring them back: --mode full (every bit "
            "set), --reference FILE (the guest data as of the last backup), or drop them with "
            "--drop-broken"
        )

    def _drop_all(self, reason: str) -> None:
        self.drop_everything = True
        for entry in self.entries:
            self.results[entry.index] = BitmapResult(entry.display_name, "dropped", reason=reason)
        if not self.entries:
            self.results[-1] = BitmapResult("*", "dropped", reason=reason)

    def _select(self, *, ignored: bool = False) -> None:
        if self.options.explicit:
            chosen = {e.index for e in self.entries if any(e.named(n) for n in self.options.names)}
        else:
            chosen = {
                b.entry.index for b in self.check.bitmaps if b.entry is not None
            }  # check_image applied the -b names
        named = bool(self.options.names)
        for entry in self.entries:
            # An entry not chosen is left alone, unless the extension is revived: the whole
            # directory becomes QEMU's again, so its name is repaired all the same.
            if entry.index not in chosen and not ignored:
                continue
            # An ignored extension's entries have no findings of their own; its names QEMU
            # would refuse are reported for the extension, each with its entry's index.
            problems = [
                f
                for f in self.check.findings
                if f.bitmap_index == entry.index
                and _refusing(f)
                and (f.area == "bitmap" or (ignored and f.area == "bitmaps"))
            ]
            repairs = {REPAIRS.get(f.code) for f in problems}
            if None in repairs:
                self.drop.add(entry.index)
                self.results[entry.index] = BitmapResult(
                    entry.display_name, "dropped", reason=problems[0].message
                )
                continue
            if "rename" in repairs:
                self.renames.add(entry.index)
            if entry.index not in chosen:
                self.stale_kept.add(entry.index)  # kept, but marked in use: still stale
                continue
            if "rewrite" in repairs:
                # QEMU loads it, but its clusters are damaged: its bits cannot be trusted.
                self.targets[entry.index] = "full"
                continue
            if "rename" in repairs and not (entry.in_use or ignored):
                self.results[entry.index] = BitmapResult(
                    entry.display_name,
                    "renamed",
                    reason="name cut at its NUL byte, as QEMU reads it",
                    granularity=entry.granularity,
                )
                continue
            if not (entry.in_use or ignored):
                if named:
                    self.results[entry.index] = BitmapResult(
                        entry.display_name,
                        "skipped",
                        reason="not in use: nothing to recover",
                        granularity=entry.granularity,
                    )
                continue
            self.targets[entry.index] = self._mode_for(entry)
        for name in self.options.enable:
            for entry in self.entries:
                if entry.named(name):
                    # Disabled for a while: which changes it missed is unknown, so every bit.
                    self.targets[entry.index] = "full"
                    self.enabling.add(entry.index)
                    self.results.pop(entry.index, None)

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
                f"bitmap {name!r}: --mode level needs a trusted consistency-level record, and there "
                f"is {why}; use --reference FILE (exact) or --mode full (every bit)"
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

    def compute(
        self, progress_factory: ProgressFactory | None, early: Comparison | None = None
    ) -> None:
        """The new bits; *early*: the reference comparison, opened and started before the
        check (:func:`_start_comparison`), used instead of opening the files again."""
        if not self.targets and not self.creations:
            return
        from qbitmap.recover.reference import Comparison, reduce_bits

        by_index = {e.index: e for e in self.entries}
        ref_targets = [i for i, m in self.targets.items() if m == "reference"]
        ref_granularities = [by_index[i].granularity for i in ref_targets] + [
            n.granularity for n in self.creations if n.mode == "reference"
        ]
        diff: np.ndarray | None = None
        fine = 0
        if ref_granularities:
            assert self.options.reference is not None
            fine = min(ref_granularities)
            comparison = early or Comparison(
                self.image.path,
                self.options.reference,
                virtual_size=self.image.virtual_size,
                reference_format=self.options.reference_format,
            )
            with comparison:
                diff, stats = comparison.bits(fine, progress_factory=progress_factory)
            if stats.reference_size != self.image.virtual_size:
                self.warn(
                    f"the reference {self.options.reference} holds {stats.reference_size} bytes "
                    f"of guest data and {self.image.path} {self.image.virtual_size}: bytes past "
                    "the shorter end compare as zeros"
                )
            self.report.reference = {"path": str(self.options.reference), **stats.to_dict()}
        tables = self.structures.tables if self.structures else {}
        for index, mode in self.targets.items():
            entry = by_index[index]
            geo = geometry_of(self.image, entry)
            on_disk = None
            try:
                on_disk = read_bits(self.image, entry, tables.get(index))
            except QbitmapError:
                if mode != "full":
                    raise
            level = None
            if mode == "full":
                bits = np.full(geo.nbytes, 0xFF, dtype=np.uint8)
            elif mode == "reference":
                assert diff is not None and on_disk is not None
                factor = entry.granularity // fine
                fine_nbits = -(-self.image.virtual_size // fine)
                bits = on_disk | reduce_bits(diff, fine_nbits, factor, geo.nbits)
            else:
                assert on_disk is not None
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
                "enabled" if index in self.enabling else "recovered",
                mode=mode,
                granularity=entry.granularity,
                dirty_bytes_before=None if on_disk is None else dirty_bytes_of(geo, on_disk),
                dirty_bytes_after=dirty_bytes_of(geo, bits),
                old_table_offset=entry.bitmap_table_offset,
                consistent_level=level,
            )
        fine_nbits = -(-self.image.virtual_size // fine) if fine else 0
        for new in self.creations:
            geo = Geometry(self.image.virtual_size, new.granularity, self.image.cluster_size)
            if new.mode == "full":
                bits = np.full(geo.nbytes, 0xFF, dtype=np.uint8)
            else:
                assert diff is not None
                bits = reduce_bits(diff, fine_nbits, new.granularity // fine, geo.nbits)
            rem = geo.nbits % 8
            if rem and len(bits):
                bits[-1] &= (1 << rem) - 1
            self.created_bits.append(bits)
            self.created.append(
                BitmapResult(
                    new.name,
                    "created",
                    mode=new.mode,
                    granularity=new.granularity,
                    dirty_bytes_after=dirty_bytes_of(geo, bits),
                )
            )

    def find_leaks(self) -> None:
        """Clusters with a refcount but no reference at all (freed in the release phase)."""
        if not self.options.reclaim_leaks:
            return
        refmap = self.refmap()
        if not refmap.complete or refmap.refcounts is None:
            return
        image_refs, bm_refs = refmap.file_reference_counts()
        rc = refmap.refcounts  # uint64: freed by its exact value, 2^63 and more included
        leaked = np.flatnonzero((rc > 0) & (image_refs + bm_refs == 0))
        self.leaks = [(int(c), int(rc[c])) for c in leaked.tolist()]
        # Past the end of the file too: a killed writer may have counted clusters it never
        # wrote (check's image-clusters-leaked-past-eof).  More of them than the walk keeps
        # one by one is not that: they are left as they are.
        beyond, counts = refmap.past_eof_clusters, refmap.past_eof_refcounts
        if len(beyond) and refmap.past_eof_total == len(beyond):
            unreferenced = refmap.reference_counts(beyond) == 0
            self.leaks += list(zip(beyond[unreferenced].tolist(), counts[unreferenced].tolist()))
        self.report.leaked_clusters_reclaimed = len(self.leaks)

    def changes_bitmaps(self) -> bool:
        return bool(
            self.creations
            or self.targets
            or self.drop
            or self.drop_everything
            or self.rewrite_directory
            or self.renames
        )

    def has_work(self) -> bool:
        return self.changes_bitmaps() or bool(self.leaks)

    # -- writing ------------------------------------------------------------------------

    def apply(self) -> None:
        session = self.session
        # Nothing may land on a cluster something references, whatever its refcount says.
        session.allocator.avoid(self.refmap().referenced_clusters())
        if self.changes_bitmaps():
            self._stage_and_commit()
        self._release()

    def _stage_and_commit(self) -> None:
        session = self.session
        new_entries: list[BitmapEntry] = []
        if not self.drop_everything:
            for entry in self.entries:
                if entry.index in self.drop:
                    continue
                if entry.index in self.targets:
                    geo = geometry_of(self.image, entry)
                    written = session.write_bitmap(
                        geo, self.new_bits[entry.index], name=entry.display_name
                    )
                    self.results[entry.index].new_table_offset = written.table_offset
                    flags = int(entry.flags) & ~int(BitmapFlag.IN_USE)
                    if entry.index in self.enabling:
                        flags |= int(BitmapFlag.AUTO)
                    entry = dataclasses.replace(
                        entry,
                        bitmap_table_offset=written.table_offset,
                        bitmap_table_size=written.table_size,
                        flags=BitmapFlag(flags),
                    )
                elif entry.index in self.stale_kept:
                    entry = dataclasses.replace(
                        entry, flags=BitmapFlag(int(entry.flags) | int(BitmapFlag.IN_USE))
                    )
                if entry.index in self.renames:
                    entry = entry.renamed(entry.qemu_name)
                new_entries.append(entry)
        for new, bits, result in zip(self.creations, self.created_bits, self.created, strict=True):
            geo = Geometry(self.image.virtual_size, new.granularity, self.image.cluster_size)
            written = session.write_bitmap(geo, bits, name=new.name)
            result.new_table_offset = written.table_offset
            new_entries.append(
                BitmapEntry.new(
                    new.name.encode("utf-8", "surrogateescape"),
                    granularity_bits=new.granularity.bit_length() - 1,
                    bitmap_table_offset=written.table_offset,
                    bitmap_table_size=written.table_size,
                    flags=BitmapFlag.AUTO,
                )
            )
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
        self._levels_changes(changes)
        if changes.get(layout.EXT_LEVELS, b"") is None:
            autoclear_clear |= 1 << layout.LEVELS_AUTOCLEAR_BIT
        # Commit: one write of cluster 0, flushed before and after.
        session.commit_header(
            extensions=changes,
            autoclear_set=autoclear_set,
            autoclear_clear=autoclear_clear,
            what=_commit_text([*self.results.values(), *self.created]),
        )

    def _removed_references(self) -> Counter[int]:
        """References to each cluster that the commit removed from the image."""
        removed: Counter[int] = Counter()
        if not self.changes_bitmaps() or self.structures is None:
            return removed
        gone = set(self.targets) | self.drop
        if self.drop_everything:
            gone = {e.index for e in self.entries}
        clusters, _kinds, index, _source = bitmap_references(self.image, self.structures)
        mine = np.isin(index, np.array([-1, *gone], dtype=np.int32))
        removed.update(clusters[mine].tolist())
        return removed

    def _release(self) -> None:
        """Drop the references the commit removed, never below what remains, then leaks."""
        session = self.session
        cs = session.cluster_size
        refmap = self.refmap()
        removed = self._removed_references()
        frees: list[tuple[int, int, str]] = []  # (cluster, decrements, what)
        per_bitmap: Counter[int] = Counter()
        if removed:
            clusters = np.array(sorted(removed), dtype=np.int64)
            total = refmap.reference_counts(clusters)
            owner = self._owners()
            for cluster, refs in zip(clusters.tolist(), total.tolist(), strict=True):
                rc = session.allocator.refcount(cluster)
                remaining = refs - removed[cluster]
                new = 0 if remaining <= 0 else min(rc, max(remaining, rc - removed[cluster]))
                if rc - new > 0:
                    index, what = owner.get(cluster, (-1, "old bitmap clusters"))
                    frees.append((cluster, rc - new, what))
                    if new == 0:
                        per_bitmap[index] += 1
        for index, count in per_bitmap.items():
            if index in self.results:
                self.results[index].freed_clusters = count
        for cluster, count in self.leaks:
            if cluster not in removed:
                frees.append((cluster, count, "leaked cluster"))
        for cluster, count, what in frees:
            session.free([Extent(cluster * cs, 1)], what=what, references=count)
        if frees:
            session.flush(what="make the refcount decrements durable")

    def _owners(self) -> dict[int, tuple[int, str]]:
        """Which bitmap (directory index, -1 the directory) each removed cluster belonged to."""
        out: dict[int, tuple[int, str]] = {}
        if self.structures is None:
            return out
        names = {e.index: e.display_name for e in self.entries}
        clusters, _kinds, index, _source = bitmap_references(self.image, self.structures)
        for cluster, i in zip(clusters.tolist(), index.tolist(), strict=True):
            what = (
                "old bitmap directory"
                if i < 0
                else f"old table/data of bitmap {names.get(i, '?')!r}"
            )
            out.setdefault(cluster, (i, what))
        return out

    def _levels_changes(self, changes: dict[int, bytes | None]) -> None:
        lev = self.image.read_levels()
        if lev is None or lev.error is not None or lev.version != layout.LEVELS_VERSION:
            return
        gone = {e.name for e in self.entries if e.index in self.targets or e.index in self.drop}
        # A record left under the name of a bitmap created now must not be read as its record.
        gone |= {n.name.encode("utf-8", "surrogateescape") for n in self.creations}
        if self.drop_everything:
            gone = {r.name for r in lev.records}
        records = [r for r in lev.records if r.name not in gone]
        if len(records) == len(lev.records):
            return
        changes[layout.EXT_LEVELS] = levels_extension_bytes(records) if records else None


def _commit_text(results: Sequence[BitmapResult]) -> str:
    parts = []
    # In the present tense: the text names a write, planned or made.
    verbs = {"recovered": "recover", "enabled": "enable", "created": "create", "dropped": "drop"}
    for action, verb in verbs.items():
        names = [r.name for r in results if r.action == action]
        if names:
            parts.append(f"{verb} " + ", ".join(repr(n) for n in names))
    return ("switch to the new directory: " + "; ".join(parts)) if parts else "header"
