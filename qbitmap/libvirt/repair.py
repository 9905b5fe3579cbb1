"""``qbitmap checkpoints DOMAIN --repair``: make a shut-off domain's checkpoints usable again.

One rule: a repaired bitmap marks at least every change made since its
checkpoint, so that an incremental backup from it copies at least what
changed and the backup chain survives.  From the diagnosis of
:mod:`qbitmap.libvirt.verdicts`, per checkpoint x disk whose every problem
is repairable in place, per layer of the disk's backing chain:

* ``in-use`` -- the bitmap is recovered: every bit set (``full``), or, with
  a reference for the disk, its on-disk bits plus every granule whose guest
  data differs from the reference (``reference``);
* ``missing`` (top image) and ``gap`` (a layer between layers that have it)
  -- the bitmap is created, recording, with the granularity QEMU would have
  chosen (the diagnosis's :attr:`~qbitmap.check.chain.LayerProblem.granularity`),
  every bit set; the newest checkpoint's bitmap in the top image is made
  from the reference instead, when there is one;
* ``not-recording`` -- every bit is set and the ``auto`` flag too: which
  changes it missed while disabled is unknown.

A reference (``--reference DISK=FILE``) holds the disk's guest data as of
the domain's newest checkpoint recording that disk (a restore of the backup
chain up to the last backup).  It is used for an in-use bitmap only in a
layer that also holds the newest checkpoint's bitmap: QEMU stored that
layer's bitmaps after the newest checkpoint, so the on-disk bits cover
every change from their checkpoint until then and the comparison every
change since; in any other layer the bitmap is set full.

Every image of the plan is prepared first (:func:`qbitmap.recover.prepare`:
locked like a QEMU writer, fully checked, decided, computed); if any refuses
-- whatever ``qbitmap recover`` refuses, a writer holding it (75) -- none
is written.  Then each image gets one crash-safe run of recover's engine
(stage, one header write, release); a crash between images leaves some
repaired and the rest as they were, and running the repair again finishes
it.  Finally the domain is examined again: what it says is what was done,
and what remains for a person (checkpoints whose bitmaps cannot be
repaired, orphans) comes with its remedies.  libvirt's files are never
written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbitmap.check.chain import worst_exit_code
from qbitmap.errors import ExitCode, QbitmapError
from qbitmap.libvirt.definitions import DomainDefinition
from qbitmap.libvirt.disks import ImageCache
from qbitmap.libvirt.verdicts import (
    CheckpointState,
    DiskVerdict,
    DomainReport,
    Remedy,
    examine_domain,
    remedies_for,
)
from qbitmap.recover import NewBitmap, Options, RecoverReport, Recovery, prepare

#: What each repairable problem becomes.
ACTIONS = {"in-use": "recover", "missing": "create", "gap": "create", "not-recording": "enable"}
#: Repair statuses.
STATUSES = ("repaired", "dry-run", "nothing-to-do", "refused", "failed", "running")


@dataclass(frozen=True)
class BitmapRepair:
    """What is done to one checkpoint's bitmap in one layer of one disk."""

    checkpoint: str
    disk: str
    layer: int
    filename: str
    bitmap: str
    problem: str  # in-use, missing, gap, not-recording
    action: str  # recover, create, enable
    mode: str  # full, reference
    granularity: int | None  # for create: the granularity it gets

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "disk": self.disk,
            "layer": self.layer,
            "filename": self.filename,
            "bitmap": self.bitmap,
            "problem": self.problem,
            "action": self.action,
            "mode": self.mode,
            "granularity": self.granularity,
        }


@dataclass
class ImagePlan:
    """Everything one image gets, in one run of recover's engine."""

    filename: str
    disk: str
    layer: int
    reference: Path | None = None
    repairs: list[BitmapRepair] = field(default_factory=list)

    def options(self, *, dry_run: bool) -> Options:
        recover = [r for r in self.repairs if r.action == "recover"]
        modes = {r.mode for r in recover}
        if len(modes) > 1:
            raise AssertionError(f"{self.filename}: one mode per image, not {sorted(modes)}")
        return Options(
            names=tuple(r.bitmap for r in recover),
            mode=modes.pop() if modes else "full",
            reference=self.reference if any(r.mode == "reference" for r in self.repairs) else None,
            create=tuple(
                NewBitmap(r.bitmap, r.granularity or 0, mode=r.mode)
                for r in self.repairs
                if r.action == "create"
            ),
            enable=tuple(r.bitmap for r in self.repairs if r.action == "enable"),
            dry_run=dry_run,
        )


def _newest_for(report: DomainReport, disk: str) -> DiskVerdict | None:
    """The verdict of the newest checkpoint that records a bitmap for *disk*."""
    newest = None
    for cp in report.checkpoints:  # oldest first
        for v in cp.disks:
            if v.disk == disk:
                newest = v
    return newest


def plan_repairs(
    report: DomainReport, references: Mapping[str, Path] | None = None
) -> list[ImagePlan]:
    """The repairs of every repairable checkpoint x disk of *report*, grouped by image.

    Images in the order of the domain's disks, each disk's layers top
    first; an image shared by several disks (a common backing file) is
    planned once, and the reference of the disk that planned it first is
    the only one used there.  Nothing is read or written.
    """
    references = dict(references or {})
    plans: dict[str, ImagePlan] = {}
    newest = {d.target: _newest_for(report, d.target) for d in report.disks}
    for v in report.verdicts():
        if not (v.problem and v.repairable and v.chain is not None):
            continue
        reference = references.get(v.disk)
        latest = newest.get(v.disk)
        is_newest = latest is not None and latest.checkpoint == v.checkpoint
        kinds_by_layer: dict[int, list[str]] = {}
        for p in v.chain.problems:
            kinds_by_layer.setdefault(p.index, []).append(p.kind)
        for p in v.chain.problems:
            kinds = kinds_by_layer[p.index]
            if p.kind == "in-use" and "not-recording" in kinds:
                continue  # enabled instead: every bit set
            action = ACTIONS[p.kind]
            mode = "full"
            if reference is not None and action == "recover":
                stored_after = (
                    latest is not None
                    and latest.chain is not None
                    and any(lb.index == p.index and lb.present for lb in latest.chain.layers)
                )
                mode = "reference" if stored_after else "full"
            elif reference is not None and action == "create":
                mode = "reference" if is_newest and p.index == 0 else "full"
            key = os.path.realpath(p.filename)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = ImagePlan(p.filename, v.disk, p.index, reference)
            elif plan.reference != reference:
                mode = "full"  # another disk's reference says nothing about this one's writes
            plan.repairs.append(
                BitmapRepair(
                    v.checkpoint,
                    v.disk,
                    p.index,
                    p.filename,
                    v.bitmap,
                    p.kind,
                    action,
                    mode,
                    p.granularity if action == "create" else None,
                )
            )
    # One mode per image for the recovered bitmaps: full wins (always correct).
    for plan in plans.values():
        recover = [r for r in plan.repairs if r.action == "recover"]
        if len({r.mode for r in recover}) > 1:
            plan.repairs = [
                r if r.action != "recover" else _with_mode(r, "full") for r in plan.repairs
            ]
    targets = [d.target for d in report.disks]
    return sorted(
        plans.values(),
        key=lambda plan: (
            targets.index(plan.disk) if plan.disk in targets else len(targets),
            plan.layer,
        ),
    )


def _with_mode(repair: BitmapRepair, mode: str) -> BitmapRepair:
    return BitmapRepair(**{**repair.to_dict(), "mode": mode})


@dataclass
class RepairReport:
    """What ``checkpoints --repair`` did to one domain, and the domain's state after it."""

    domain: str
    dry_run: bool
    before: DomainReport
    after: DomainReport | None = None  # examined again after the writes (real runs)
    status: str = "nothing-to-do"  # one of STATUSES
    message: str | None = None  # why refused or failed
    refused_exit_code: int | None = None
    references: dict[str, str] = field(default_factory=dict)
    repairs: list[BitmapRepair] = field(default_factory=list)
    images: list[RecoverReport] = field(default_factory=list)

    @property
    def shown(self) -> DomainReport:
        """The diagnosis to show: after the repair when it wrote, else before it."""
        return self.after if self.after is not None else self.before

    @property
    def remains(self) -> list[Remedy]:
        """What is left for a person once the repair is done (or would be, for a dry run)."""
        if self.after is not None:
            return list(self.after.remedies)
        if self.status not in ("dry-run", "nothing-to-do"):
            return list(self.before.remedies)
        trimmed = dataclasses.replace(
            self.before,
            checkpoints=[
                CheckpointState(
                    cp.definition, [v for v in cp.disks if not (v.problem and v.repairable)]
                )
                for cp in self.before.checkpoints
            ],
        )
        return remedies_for(trimmed)

    @property
    def exit_code(self) -> int:
        if self.status == "running":
            return int(ExitCode.BUSY)
        if self.status in ("refused", "failed"):
            return self.refused_exit_code or int(ExitCode.FAILED)
        if self.status == "dry-run":
            return predicted_exit_code(self.before)
        return self.shown.exit_code

    def to_dict(self) -> dict[str, Any]:
        out = self.shown.to_dict()
        out["repair"] = {
            "dry_run": self.dry_run,
            "status": self.status,
            "message": self.message,
            "references": self.references,
            "repairs": [r.to_dict() for r in self.repairs],
            "images": [i.to_dict() for i in self.images],
            "remains": [r.to_dict() for r in self.remains],
            "exit_code_before": self.before.exit_code,
        }
        out["exit_code"] = self.exit_code
        return out


def predicted_exit_code(report: DomainReport) -> int:
    """*report*'s exit status once every repairable problem is repaired."""
    codes = []
    if report.findings:
        codes.append(ExitCode.FAILED)
    if report.running:
        codes.append(ExitCode.BUSY)
    for v in report.verdicts():
        if v.verdict == "unreadable":
            codes.append(ExitCode.FAILED)
        elif v.problem and not v.repairable:
            codes.append(ExitCode.CORRUPT)
    return worst_exit_code(codes)


def repair_domain(
    domain: DomainDefinition,
    before: DomainReport,
    *,
    checkpoint_dir: Path,
    references: Mapping[str, Path] | None = None,
    dry_run: bool = False,
    progress_factory: Callable[[str, int], Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RepairReport:
    """Repair every repairable checkpoint of *domain*, diagnosed as *before*; see the module.

    Never raises for what an image refuses: the report says ``refused``
    with recover's exit status and nothing was written.
    """
    refs = {disk: Path(path) for disk, path in (references or {}).items()}
    report = RepairReport(
        domain.name,
        dry_run,
        before,
        references={disk: os.fspath(path) for disk, path in refs.items()},
    )
    if before.running:
        report.status = "running"
        report.message = "the domain is running: nothing was written"
        return report
    plans = plan_repairs(before, refs)
    report.repairs = [r for plan in plans for r in plan.repairs]
    if not plans:
        return report
    with contextlib.ExitStack() as stack:
        prepared: list[Recovery] = []
        try:
            for plan in plans:
                prepared.append(
                    stack.enter_context(
                        prepare(
                            plan.filename,
                            plan.options(dry_run=dry_run),
                            progress_factory=progress_factory,
                            warn=warn,
                        )
                    )
                )
        except QbitmapError as exc:
            report.status = "refused"
            report.message = f"{exc}; nothing was written"
            report.refused_exit_code = int(exc.exit_code)
            return report
        try:
            for recovery in prepared:
                report.images.append(recovery.apply())
        except QbitmapError as exc:
            report.status = "failed"
            done = ", ".join(i.filename for i in report.images) or "none"
            report.message = (
                f"{exc}; images repaired before the failure: {done} (running the repair again "
                "finishes it)"
            )
            report.refused_exit_code = int(ExitCode.FAILED)
    if dry_run:
        report.status = "dry-run"
        return report
    report.after = examine_domain(domain, checkpoint_dir=checkpoint_dir, cache=ImageCache())
    if report.status != "failed":
        report.status = "repaired"
    return report


def parse_references(specs: Iterable[str], domain: DomainDefinition | None) -> dict[str, Path]:
    """``DISK=FILE`` options into ``{disk: path}``; raises ValueError with one sentence."""
    out: dict[str, Path] = {}
    for spec in specs:
        disk, sep, path = spec.partition("=")
        if not sep or not disk or not path:
            raise ValueError(f"--reference {spec!r}: give DISK=FILE, e.g. vda=/backup/vda.qcow2")
        if disk in out:
            raise ValueError(f"--reference names disk {disk!r} twice")
        if domain is not None and domain.disk(disk) is None:
            targets = ", ".join(d.target for d in domain.disks) or "none"
            raise ValueError(
                f"--reference {spec!r}: domain {domain.name!r} has no disk {disk!r} "
                f"(its disks: {targets})"
            )
        if not Path(path).is_file() and not Path(path).is_block_device():
            raise ValueError(f"--reference {spec!r}: {path} is not a file")
        out[disk] = Path(path)
    return out


__all__ = [
    "ACTIONS",
    "STATUSES",
    "BitmapRepair",
    "ImagePlan",
    "RepairReport",
    "parse_references",
    "plan_repairs",
    "predicted_exit_code",
    "repair_domain",
]
