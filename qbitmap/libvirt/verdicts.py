"""libvirt's view of a domain's checkpoints, worked out offline from its files and images.

For each checkpoint x disk of a shut-off domain, the verdict libvirt would
reach before an incremental backup (``virsh backup-begin`` with
``<incremental>``) or ``virsh checkpoint-create --redefine
--redefine-validate``: libvirt looks up, in the disk's backing chain, the
bitmap named after the *checkpoint* (src/qemu/qemu_backup.c and
src/qemu/qemu_checkpoint.c use the checkpoint's name, not the recorded
``bitmap=`` attribute) and applies the chain rule of
:mod:`qbitmap.check.chain`.  Disks a checkpoint records as
``checkpoint='no'`` are not part of it; a disk the domain no longer has is
skipped by libvirt too (``disk-gone``).

Also reported: bitmaps in the disks whose name is no checkpoint's name
(``orphans``: the cause of ``Bitmap already exists`` when a tool creates a
checkpoint of that name), libvirt files that cannot be read (``findings``),
and per problem the command lines that remedy it.

A domain whose disks' lock bytes a writer holds is running: its bitmaps
live in QEMU's memory and libvirt's own view is authoritative, so no
verdict is given (exit status 75).

Nothing here writes.  :class:`DiskVerdict` carries, per layer, what the
chain holds and each problem with its layer and whether it can be repaired
in place, so that a repair can be planned from it alone.
"""

from __future__ import annotations

import shlex
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbitmap.check.chain import PROBLEMS, ChainBitmapVerdict, judge_bitmap, worst_exit_code
from qbitmap.errors import ExitCode
from qbitmap.libvirt.definitions import (
    CheckpointDefinition,
    DomainDefinition,
    read_checkpoint,
    read_domain,
)
from qbitmap.libvirt.disks import DiskState, ImageCache
from qbitmap.libvirt.parallel import examine_disks
from qbitmap.libvirt.xmlsafe import XmlProblem

#: Where libvirt's QEMU driver keeps persistent domain definitions (system instance).
DEFAULT_CONFIG_DIR = Path("/etc/libvirt/qemu")
#: Where it keeps checkpoint metadata, one directory per domain.
DEFAULT_CHECKPOINT_DIR = Path("/var/lib/libvirt/qemu/checkpoint")

#: Verdicts beyond the chain rule's, for disks that cannot be judged.
NOT_JUDGED = ("running", "not-checkable", "disk-gone")
#: Every checkpoint x disk verdict, worst first (a checkpoint's verdict is its worst disk's).
VERDICT_ORDER = (*PROBLEMS, *NOT_JUDGED, "ok")


@dataclass(frozen=True)
class DiskVerdict:
    """Whether libvirt accepts checkpoint *checkpoint* for disk *disk*, and why not."""

    checkpoint: str
    disk: str  # the disk target (vda)
    bitmap: str  # the bitmap name libvirt looks up: the checkpoint's name
    verdict: str  # one of VERDICT_ORDER
    reason: str  # one sentence
    chain: ChainBitmapVerdict | None = None  # per layer state and problems, when judged
    recorded_bitmap: str | None = None  # the metadata's bitmap= attribute

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def problem(self) -> bool:
        """libvirt refuses the checkpoint for this disk."""
        return self.verdict in PROBLEMS

    @property
    def repairable(self) -> bool:
        """Every problem can be repaired in place (in-use, missing, gap, not-recording)."""
        return self.chain is not None and self.chain.repairable

    def to_dict(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "bitmap": self.bitmap,
            "recorded_bitmap": self.recorded_bitmap,
            "verdict": self.verdict,
            "reason": self.reason,
            "repairable": self.repairable,
            "chain": None if self.chain is None else self.chain.to_dict(),
        }


@dataclass
class CheckpointState:
    """One checkpoint and its verdict per disk."""

    definition: CheckpointDefinition
    disks: list[DiskVerdict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def verdict(self) -> str:
        found = {d.verdict for d in self.disks}
        for verdict in VERDICT_ORDER:
            if verdict in found:
                return verdict
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        d = self.definition
        return {
            "name": d.name,
            "parent": d.parent,
            "creation_time": d.creation_time,
            "current": d.current,
            "file": d.path,
            "verdict": self.verdict,
            "disks": [v.to_dict() for v in self.disks],
        }


@dataclass(frozen=True)
class Orphan:
    """A bitmap in a disk whose name is no checkpoint's name."""

    disk: str
    index: int  # chain layer
    filename: str
    bitmap: str
    status: str  # check's status: consistent, in-use, corrupt
    flags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "disk": self.disk,
            "layer": self.index,
            "filename": self.filename,
            "bitmap": self.bitmap,
            "status": self.status,
            "flags": list(self.flags),
        }


@dataclass(frozen=True)
class Finding:
    """A libvirt file that could not be used."""

    file: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "message": self.message}


@dataclass(frozen=True)
class Remedy:
    """A command line a person (or qbitmap) runs to remedy a problem."""

    problem: str  # the verdict it remedies, or "orphan"
    argv: tuple[str, ...]
    note: str  # one sentence: what it does, and its cost
    checkpoints: tuple[str, ...] = ()
    disk: str | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "checkpoints": list(self.checkpoints),
            "disk": self.disk,
            "command": self.command,
            "argv": list(self.argv),
            "note": self.note,
        }


@dataclass
class DomainReport:
    """Everything ``qbitmap checkpoints DOMAIN`` reports."""

    domain: str
    definition: str | None  # the domain definition file read
    checkpoint_dir: str
    checkpoints: list[CheckpointState] = field(default_factory=list)
    disks: list[DiskState] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    remedies: list[Remedy] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return any(d.running for d in self.disks)

    def verdicts(self) -> Iterable[DiskVerdict]:
        for cp in self.checkpoints:
            yield from cp.disks

    @property
    def exit_code(self) -> int:
        codes = []
        if self.findings:
            codes.append(ExitCode.FAILED)
        if self.running:
            codes.append(ExitCode.BUSY)
        for v in self.verdicts():
            if v.verdict == "unreadable":
                codes.append(ExitCode.FAILED)
            elif v.problem:
                codes.append(ExitCode.IN_USE if v.repairable else ExitCode.CORRUPT)
        return worst_exit_code(codes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "definition": self.definition,
            "checkpoint_dir": self.checkpoint_dir,
            "running": self.running,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
            "disks": [d.to_dict() for d in self.disks],
            "orphans": [o.to_dict() for o in self.orphans],
            "findings": [f.to_dict() for f in self.findings],
            "remedies": [r.to_dict() for r in self.remedies],
            "exit_code": self.exit_code,
        }


# -- reading --------------------------------------------------------------------------------


def _checkpoint_files(directory: Path) -> tuple[list[Path], Finding | None]:
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return [], None  # libvirt creates it with the domain's first checkpoint
    except OSError as exc:
        return [], Finding(str(directory), f"{directory}: cannot be listed: {exc.strerror}")
    files = []
    for entry in entries:
        if entry.suffix != ".xml":
            continue
        try:
            if stat.S_ISREG(entry.lstat().st_mode):
                files.append(entry)
        except OSError:
            continue
    return files, None


def _judge(
    cp: CheckpointDefinition, disks: dict[str, DiskState], *, running: bool
) -> list[DiskVerdict]:
    out = []
    for cd in cp.disks:
        if cd.checkpoint != "bitmap":
            continue
        recorded = cd.bitmap if cd.bitmap != cp.name else None
        note = ""
        if recorded is not None:
            note = (
                f" (the metadata records bitmap {recorded!r}; libvirt looks up the checkpoint's "
                "name)"
            )
        state = disks.get(cd.name)
        if state is None:
            was = ""
            if cp.domain is not None:
                old = cp.domain.disk(cd.name)
                if old is not None and old.source:
                    was = f" (it was {old.source})"
            out.append(
                DiskVerdict(
                    cp.name,
                    cd.name,
                    cp.name,
                    "disk-gone",
                    f"the domain has no disk {cd.name!r} any more{was}; libvirt skips it",
                    recorded_bitmap=recorded,
                )
            )
        elif state.not_checkable is not None:
            out.append(
                DiskVerdict(
                    cp.name,
                    cd.name,
                    cp.name,
                    "not-checkable",
                    state.not_checkable + note,
                    recorded_bitmap=recorded,
                )
            )
        elif running:
            out.append(
                DiskVerdict(
                    cp.name,
                    cd.name,
                    cp.name,
                    "running",
                    "the domain is running: its bitmaps are in QEMU's memory",
                    recorded_bitmap=recorded,
                )
            )
        elif state.error is not None:
            out.append(
                DiskVerdict(
                    cp.name, cd.name, cp.name, "unreadable", state.error, recorded_bitmap=recorded
                )
            )
        else:
            chain = judge_bitmap(cp.name, state.views, chain_error=state.chain_error)
            out.append(
                DiskVerdict(
                    cp.name,
                    cd.name,
                    cp.name,
                    chain.verdict,
                    chain.reason + note,
                    chain=chain,
                    recorded_bitmap=recorded,
                )
            )
    return out


def _orphans(disks: Sequence[DiskState], known: set[str]) -> list[Orphan]:
    out = []
    for state in disks:
        for view in state.views:
            if view.report is None:
                continue
            for b in view.report.bitmaps:
                if b.name in known:
                    continue
                flags = tuple(b.entry.flag_words) if b.entry is not None else ()
                out.append(Orphan(state.target, view.index, view.filename, b.name, b.status, flags))
    return out


def _report(domain: DomainDefinition, disks: list[DiskState], checkpoint_dir: Path) -> DomainReport:
    directory = checkpoint_dir / domain.name
    report = DomainReport(domain.name, domain.path, str(directory))
    files, problem = _checkpoint_files(directory)
    if problem is not None:
        report.findings.append(problem)
    checkpoints: list[CheckpointDefinition] = []
    known: set[str] = set()
    for path in files:
        # A checkpoint whose file cannot be read is still a checkpoint: its bitmap is no orphan.
        known.add(path.stem)
        try:
            cp = read_checkpoint(path)
        except XmlProblem as exc:
            report.findings.append(Finding(exc.path, str(exc)))
            continue
        known.add(cp.name)
        checkpoints.append(cp)
    checkpoints.sort(key=lambda c: (c.creation_time or 0, c.name))
    report.disks = disks
    by_target = {d.target: d for d in disks}
    for cp in checkpoints:
        report.checkpoints.append(
            CheckpointState(cp, _judge(cp, by_target, running=report.running))
        )
    if not report.running:
        report.orphans = _orphans(disks, known)
    report.remedies = remedies_for(report)
    return report


def examine_domains(
    domains: Sequence[DomainDefinition],
    *,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    cache: ImageCache | None = None,
    jobs: int | None = None,
) -> list[DomainReport]:
    """libvirt's view of each domain's checkpoints, from its files and images, read-only.

    The disks of every domain are examined together (in parallel when
    there are enough of them and CPUs for it; *jobs* caps the workers).
    """
    cache = cache or ImageCache()
    states = examine_disks([d for dom in domains for d in dom.disks], cache, jobs=jobs)
    reports = []
    for dom in domains:
        mine, states = states[: len(dom.disks)], states[len(dom.disks) :]
        reports.append(_report(dom, mine, checkpoint_dir))
    return reports


def examine_domain(
    domain: DomainDefinition,
    *,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    cache: ImageCache | None = None,
    jobs: int | None = None,
) -> DomainReport:
    """:func:`examine_domains` for one domain."""
    (report,) = examine_domains([domain], checkpoint_dir=checkpoint_dir, cache=cache, jobs=jobs)
    return report


def examine_domain_files(
    paths: Sequence[Path],
    *,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    cache: ImageCache | None = None,
    jobs: int | None = None,
) -> list[DomainReport]:
    """:func:`examine_domains` for definition files; an unreadable one is a report too."""
    readable: list[DomainDefinition] = []
    slots: list[DomainReport | int] = []
    for path in paths:
        try:
            readable.append(read_domain(path))
            slots.append(len(readable) - 1)
        except XmlProblem as exc:
            report = DomainReport(path.stem, str(path), str(checkpoint_dir / path.stem))
            report.findings.append(Finding(exc.path, str(exc)))
            slots.append(report)
    examined = examine_domains(readable, checkpoint_dir=checkpoint_dir, cache=cache, jobs=jobs)
    return [examined[slot] if isinstance(slot, int) else slot for slot in slots]


def domain_files(config_dir: Path) -> list[Path]:
    """Every domain definition in *config_dir* (``*.xml`` regular files, by name)."""
    out = []
    for entry in sorted(config_dir.iterdir()):
        if entry.suffix == ".xml" and stat.S_ISREG(entry.lstat().st_mode):
            out.append(entry)
    return out


# -- remedies -------------------------------------------------------------------------------


def repair_argv(report: DomainReport) -> tuple[str, ...]:
    """``qbitmap checkpoints DOMAIN --repair``, with the options that find the same files."""
    argv = ["qbitmap", "checkpoints", report.domain, "--repair"]
    if report.definition is not None:
        definition = Path(report.definition)
        if definition.name != f"{report.domain}.xml":
            argv[2:3] = ["--domain-xml", report.definition]
        elif definition.parent != DEFAULT_CONFIG_DIR:
            argv += ["--config-dir", str(definition.parent)]
    checkpoints = Path(report.checkpoint_dir).parent
    if checkpoints != DEFAULT_CHECKPOINT_DIR and report.checkpoint_dir != "-":
        argv += ["--checkpoint-dir", str(checkpoints)]
    return tuple(argv)


def remedies_for(report: DomainReport) -> list[Remedy]:
    """The command lines that remedy every problem of *report*, each once, in a sensible order."""
    domain = report.domain
    found: dict[tuple[str, tuple[str, ...]], Remedy] = {}

    def add(
        problem: str,
        argv: Sequence[str],
        note: str,
        checkpoint: str | None = None,
        disk: str | None = None,
    ) -> None:
        key = (problem, tuple(argv))
        old = found.get(key)
        names = () if checkpoint is None else (checkpoint,)
        if old is not None:
            names = tuple(dict.fromkeys(old.checkpoints + names))
            disk = old.disk if old.disk == disk else None
        found[key] = Remedy(problem, tuple(argv), note, names, disk)

    repair = repair_argv(report)
    repair_note = (
        "repairs every repairable checkpoint in place (domain shut off) so that the backup "
        "chain survives: each repaired bitmap marks at least every change since its checkpoint"
    )
    drop_note = (
        "drops libvirt's record of the checkpoint (metadata only); the next backup of the "
        "disk must be a full one"
    )
    for v in report.verdicts():
        if not v.problem:
            continue
        problems = () if v.chain is None else v.chain.problems
        if v.repairable:
            add(v.verdict, repair, repair_note, v.checkpoint, v.disk)
        for p in problems:
            if p.kind == "in-use" and v.repairable:
                add(
                    "in-use",
                    ("qbitmap", "recover", "--mode", "full", p.filename),
                    "marks every bit of the image's in-use bitmaps dirty and clears in-use "
                    "(safe: the next incremental backup copies the whole disk once)",
                    v.checkpoint,
                    v.disk,
                )
            elif p.kind in ("corrupt", "unreadable") and p.filename:
                add(
                    p.kind,
                    ("qbitmap", "check", p.filename),
                    "shows what is wrong with the image, field by field",
                    v.checkpoint,
                    v.disk,
                )
                own = v.chain is not None and any(
                    lb.index == p.index and lb.status == "corrupt" for lb in v.chain.layers
                )
                if p.kind == "corrupt" and own:
                    add(
                        "corrupt",
                        ("qbitmap", "recover", "--drop-broken", p.filename),
                        "removes the bitmaps whose metadata is corrupt (domain shut off), "
                        "freeing only clusters they alone own",
                        v.checkpoint,
                        v.disk,
                    )
        if v.verdict in ("in-use", "unreadable"):
            continue
        # Problems no qbitmap command repairs today: what a person does by hand.
        add(
            v.verdict,
            ("virsh", "checkpoint-delete", domain, v.checkpoint, "--metadata"),
            drop_note,
            v.checkpoint,
            v.disk,
        )
        if v.verdict == "corrupt" or v.chain is None:
            continue
        for layer in v.chain.layers:
            if layer.present:
                add(
                    v.verdict,
                    ("qemu-img", "bitmap", "--remove", layer.filename, v.bitmap),
                    "removes the checkpoint's bitmap from the image (domain shut off) once its "
                    "metadata is dropped",
                    v.checkpoint,
                    v.disk,
                )
    for orphan in report.orphans:
        add(
            "orphan",
            ("qemu-img", "bitmap", "--remove", orphan.filename, orphan.bitmap),
            "removes a bitmap no checkpoint names (domain shut off; only if no other tool "
            "uses it); creating a checkpoint of that name fails with 'Bitmap already exists' "
            "while it is there",
            disk=orphan.disk,
        )
    order = {kind: i for i, kind in enumerate((*PROBLEMS, "orphan"))}
    return sorted(found.values(), key=lambda r: order.get(r.problem, 99))


__all__ = [
    "DEFAULT_CHECKPOINT_DIR",
    "DEFAULT_CONFIG_DIR",
    "NOT_JUDGED",
    "VERDICT_ORDER",
    "CheckpointState",
    "DiskVerdict",
    "DomainReport",
    "Finding",
    "Orphan",
    "Remedy",
    "domain_files",
    "examine_domain",
    "examine_domain_files",
    "examine_domains",
    "remedies_for",
]
