"""``qbitmap check``: image -> CheckReport(findings, bitmaps).  Pure: never prints.

Corruption is never an exception here: every problem is a :class:`Finding`
with a stable code from :data:`CODES`.  The modules run in order, each
reading what the earlier ones learnt (see ``context.py``):

* ``header``     feature bits, extension area, the bitmaps extension's presence
* ``directory``  QEMU's extension checks, the directory walk, every entry rule, names
* ``tables``     table location and entries, data inside the file, bits past the end
* ``clusters``   the reference map: overlaps, refcounts and leaks of bitmap clusters
* ``levels``     in-use bitmaps and their consistency-level records

Exit codes: the first of 1 (could not check), 75 (a running writer holds the
image), 2 (corrupt), 4 (stale bitmaps recover can bring back), 3 (leaks) that
applies, else 0.

Two scopes (:data:`SCOPES`).  ``full``, the default, is all of the above:
``qbitmap check``, and what ``recover`` runs before it writes.  ``open`` is
what QEMU checks when it opens the image -- the header, the extensions, the
bitmap directory and every entry, the bitmap tables' entries, and where the
refcount, L1 and snapshot tables and the encryption header lie -- and the
bitmaps' flags: everything libvirt's verdict on a checkpoint depends on
(``qbitmap checkpoints``), without walking every L1/L2 table and refcount
and without the consistency-level records.  On an image QEMU refuses to
open, both scopes give the same exit status and bitmap statuses
(tests/check/test_scope.py pins it over the corruption catalogue).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbitmap import levels as levels_mod
from qbitmap import lockbytes
from qbitmap.check import clusters, directory, header, levels, tables
from qbitmap.check.context import Context
from qbitmap.check.findings import CODES, REPAIRS, Finding, Severity
from qbitmap.check.levels import RecoveryEstimate
from qbitmap.errors import ExitCode, ImageFormatError, ImageIOError, QbitmapError, UsageError
from qbitmap.format import BitmapEntry, Image, select_entries
from qbitmap.format.references import Kind, ReferenceMap

STATUSES = ("consistent", "in-use", "corrupt", "ignored")
#: What check_image looks at: everything, or what QEMU checks when it opens the image.
SCOPES = ("full", "open")


@dataclass
class BitmapStatus:
    """The verdict on one bitmap."""

    name: str
    status: str  # "consistent" | "in-use" | "corrupt" | "ignored" (autoclear bit 0 clear)
    entry: BitmapEntry | None
    levels: levels_mod.Assessment | None
    recovery: RecoveryEstimate | None = None

    def levels_dict(self) -> dict[str, Any] | None:
        """The ``levels`` object of the JSON output."""
        a = self.levels
        if a is None:
            return None
        out: dict[str, Any] = {"status": a.status}
        if a.status == "absent":
            return out
        out.update(
            reason=a.reason,
            record_offset=a.record_offset,
            consistent_level=a.consistent_level,
            max_level=a.max_level,
            level_bits=a.level_bits,
            recovery_granularity=None if self.recovery is None else self.recovery.granularity,
            recovery_dirty_bytes=None if self.recovery is None else self.recovery.dirty_bytes,
            on_disk_dirty_bytes=None
            if self.recovery is None
            else self.recovery.on_disk_dirty_bytes,
        )
        return out


@dataclass
class CheckReport:
    """Everything ``check`` found about one image."""

    filename: str
    findings: list[Finding] = field(default_factory=list)
    bitmaps: list[BitmapStatus] = field(default_factory=list)
    # The reference map the check built (every structure, bitmaps included when QEMU would
    # load them: what ``qbitmap.format.references.reference_map`` returns), None if the check
    # stopped before;
    # ``recover`` reuses it instead of walking every L1/L2 table a second time.
    reference_map: ReferenceMap | None = field(default=None, repr=False, compare=False)

    @property
    def exit_code(self) -> int:
        severities = {f.severity for f in self.findings}
        for severity, code in (
            (Severity.FAILED, ExitCode.FAILED),
            (Severity.BUSY, ExitCode.BUSY),
            (Severity.CORRUPT, ExitCode.CORRUPT),
            (Severity.IN_USE, ExitCode.IN_USE),
            (Severity.LEAK, ExitCode.LEAKS),
        ):
            if severity in severities:
                return int(code)
        return int(ExitCode.OK)

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "findings": [f.to_dict() for f in self.findings],
            "bitmaps": [
                {"name": b.name, "status": b.status, "levels": b.levels_dict()}
                for b in self.bitmaps
            ],
            "exit_code": self.exit_code,
        }


def _statuses(ctx: Context, findings: list[Finding]) -> tuple[set[int], bool]:
    corrupt = {
        f.bitmap_index
        for f in findings
        if f.severity >= Severity.CORRUPT and f.area == "bitmap" and f.bitmap_index is not None
    }
    area = any(f.severity >= Severity.CORRUPT and f.area == "bitmaps" for f in findings)
    return corrupt, area  # type: ignore[return-value]


def check_image(
    image: Image,
    *,
    names: Sequence[str] | None = None,
    held_locks: tuple[int, ...] | None = None,
    scope: str = "full",
) -> CheckReport:
    """Check the bitmaps of an open image.

    *names* restricts the bitmaps reported (image-wide findings are kept);
    a name the directory does not have raises :class:`UsageError` when the
    directory could be read.  *held_locks* overrides the lock-byte probe
    (tests); by default the image's lock bytes are tested.  *scope* is one
    of :data:`SCOPES` (see the module docstring); with ``open`` the report
    has no reference map and no consistency-level assessments.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown check scope {scope!r}")
    if held_locks is None:
        held_locks = lockbytes.probe(image.fd)
    ctx = Context(image=image, held_locks=held_locks, scope=scope)
    findings: list[Finding] = []
    assessments: dict[int, levels_mod.Assessment] = {}
    estimates: dict[int, RecoveryEstimate | None] = {}
    try:
        for module in (header, directory, tables):
            findings.extend(module.check(ctx))
        if scope == "open":
            findings.extend(clusters.open_check(ctx))
            findings.extend(levels.in_use_findings(ctx))
        else:
            findings.extend(clusters.check(ctx))
            corrupt, area_corrupt = _statuses(ctx, findings)
            sound = {e.index for e in ctx.entries if e.index not in corrupt and not area_corrupt}
            more, assessments, estimates = levels.check(ctx, sound)
            findings.extend(more)
    except ImageIOError as exc:
        findings.append(Finding("image-read-error", f"the check stopped: {exc}", field="read"))
    except ImageFormatError as exc:
        # A structure QEMU also reads does not parse: the image is corrupt, not unreadable.
        findings.append(
            Finding(
                "image-invalid",
                f"the check stopped: {exc}",
                offset=exc.offset,
                field=exc.field,
            )
        )
    except QbitmapError as exc:
        # A structure the check modules expected to be readable was not; say so rather than crash.
        findings.append(
            Finding(
                "image-read-error",
                f"the check stopped: {exc}",
                offset=getattr(exc, "offset", None),
                field=getattr(exc, "field", None),
            )
        )
    corrupt, area_corrupt = _statuses(ctx, findings)
    bitmaps = []
    for entry in ctx.entries:
        if entry.index in corrupt or area_corrupt:
            status = "corrupt"
        elif entry.in_use:
            status = "in-use"
        else:
            status = "consistent"
        bitmaps.append(
            BitmapStatus(
                name=entry.display_name,
                status=status,
                entry=entry,
                levels=assessments.get(entry.index),
                recovery=estimates.get(entry.index),
            )
        )
    for entry in ctx.ignored:
        bitmaps.append(BitmapStatus(entry.display_name, "ignored", entry, None))
    if names:
        chosen, missing = select_entries([b.entry for b in bitmaps if b.entry], names)
        directory_sound = (ctx.directory_readable and not area_corrupt) or bool(ctx.ignored)
        if missing and (directory_sound or ctx.extension is None):
            raise UsageError(f"{image.path}: no bitmap named {missing[0]!r}")
        wanted = {id(e) for e in chosen}
        indices = {e.index for e in chosen}
        bitmaps = [b for b in bitmaps if id(b.entry) in wanted]
        findings = [f for f in findings if f.area != "bitmap" or f.bitmap_index in indices]
    findings.sort(key=Finding.sort_key)
    return CheckReport(
        filename=str(image.path), findings=findings, bitmaps=bitmaps, reference_map=ctx.refmap
    )


def check_path(path: str | os.PathLike[str], *, names: Sequence[str] | None = None) -> CheckReport:
    """Open *path* read-only (no lock taken) and check it; an unreadable file is a report too."""
    try:
        image = Image.open(path)
    except ImageFormatError as exc:
        # A file with the qcow2 magic is a qcow2 image QEMU refuses to open: corrupt (exit 2).
        # Without it, the file is something else, which check cannot judge (exit 1).
        code = "image-unreadable" if exc.field == "magic" else "image-invalid"
        return CheckReport(
            filename=str(path),
            findings=[Finding(code, f"{Path(path)}: {exc}", offset=exc.offset, field=exc.field)],
        )
    except QbitmapError as exc:
        offset = getattr(exc, "offset", None)
        return CheckReport(
            filename=str(path),
            findings=[
                Finding(
                    "image-unreadable",
                    str(exc) if offset is None else f"{Path(path)}: {exc}",
                    offset=offset,
                    field=getattr(exc, "field", None),
                )
            ],
        )
    with image:
        return check_image(image, names=names)


__all__ = [
    "CODES",
    "REPAIRS",
    "SCOPES",
    "STATUSES",
    "BitmapStatus",
    "CheckReport",
    "Finding",
    "Kind",
    "RecoveryEstimate",
    "ReferenceMap",
    "Severity",
    "check_image",
    "check_path",
]
