"""Rendering of ``qbitmap checkpoints``: a rich view for people, one JSON object for scripts.

Names from libvirt's files and from images (domains, checkpoints, disks,
bitmaps, paths) are data: every one goes into a ``Text`` with control
characters escaped, never through markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from qbitmap.check.chain import worst_exit_code
from qbitmap.render import printable, section_table

if TYPE_CHECKING:
    from rich.console import RenderableType

    from qbitmap.libvirt import DomainReport, Remedy
    from qbitmap.libvirt.repair import BitmapRepair, RepairReport

_VERDICT_STYLE = {
    "ok": "green",
    "in-use": "bold yellow",
    "missing": "bold yellow",
    "gap": "bold yellow",
    "not-recording": "bold yellow",
    "corrupt": "bold red",
    "unreadable": "bold red",
    "running": "cyan",
    "not-checkable": "dim",
    "disk-gone": "dim",
}

RESULTS = {
    0: "every checkpoint usable",
    1: "could not read everything",
    2: "some checkpoint unusable, not repairable here",
    4: "every problem repairable by --repair",
    75: "running: libvirt's own view is authoritative",
}


def running_message(report: DomainReport) -> str:
    held = [d.target for d in report.disks if d.running]
    return (
        f"domain {report.domain!r} is running (a writer holds the lock bytes of "
        f"{', '.join(held)}): while it runs its bitmaps live in QEMU's memory and libvirt's own "
        f"view is authoritative; ask libvirt ('virsh backup-begin', or 'virsh checkpoint-create "
        f"{report.domain} FILE --redefine --redefine-validate'), or shut it off first"
    )


def to_json(reports: Sequence[DomainReport | RepairReport], *, all_domains: bool) -> dict[str, Any]:
    """The JSON object: one domain's report, or ``{"domains": [...], "exit_code"}`` for --all."""
    if not all_domains:
        (report,) = reports
        return report.to_dict()
    return {
        "domains": [r.to_dict() for r in reports],
        "exit_code": worst_exit_code(r.exit_code for r in reports),
    }


def write_json(
    out: IO[str], reports: Sequence[DomainReport | RepairReport], *, all_domains: bool
) -> None:
    out.write(json.dumps(to_json(reports, all_domains=all_domains)) + "\n")


def _t(text: str, style: str = "") -> Any:
    from rich.text import Text

    return Text(printable(text), style=style)


def remedies_view(title: str, remedies: Sequence[Remedy]) -> RenderableType:
    """Each command line once, with every problem it remedies under it."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    parts: list[RenderableType] = [Text(title, style="bold")]
    by_command: dict[str, list[Remedy]] = {}
    for r in remedies:
        by_command.setdefault(r.command, []).append(r)
    for command, group in by_command.items():
        line = Text("  $ ")
        line.append(printable(command), style="bold")
        parts.append(line)
        for r in group:
            about = r.problem
            if r.checkpoints:
                about += ": " + ", ".join(printable(c) for c in r.checkpoints)
            if r.disk:
                about += f" on {printable(r.disk)}"
            note = "" if r is not group[-1] else f" -- {r.note}"
            parts.append(Padding(Text(about + note), (0, 0, 0, 6)))
    return Group(*parts)


def domain_view(
    report: DomainReport, *, result: bool = True, remedies: bool = True
) -> RenderableType:
    """One domain: its disks, checkpoints x disks, orphans, findings, remedies and result."""
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [
        Text.assemble(
            ("Domain ", "bold"),
            (printable(report.domain), "bold"),
            f"  ({printable(report.definition or '-')}; checkpoints in "
            f"{printable(report.checkpoint_dir)})",
        )
    ]
    if report.disks:
        table = section_table("Disks", pad_edge=False)
        table.add_column("disk", no_wrap=True)
        table.add_column("backing chain (top first)", overflow="fold")
        table.add_column("state", overflow="fold")
        for disk in report.disks:
            if disk.not_checkable is not None:
                chain = printable(disk.definition.source or "-")
                state = _t("not checkable: " + disk.not_checkable, "dim")
            elif disk.error is not None:
                chain, state = printable(disk.definition.source or "-"), _t(disk.error, "bold red")
            elif disk.running:
                chain = printable(disk.definition.source or "-")
                state = _t("held by a running writer", "cyan")
            else:
                chain = " <- ".join(
                    printable(v.filename)
                    + ("" if v.layer.format == "qcow2" else f" ({v.layer.format})")
                    for v in disk.views
                )
                state = (
                    _t("chain stopped: " + disk.chain_error.message, "bold red")
                    if (disk.chain_error is not None)
                    else _t("read")
                )
            table.add_row(_t(disk.target), Text(chain), state)
        parts.append(table)
    if report.running:
        parts.append(_t(running_message(report), "cyan"))
    if report.checkpoints:
        table = section_table("Checkpoints (oldest first)", pad_edge=False)
        table.add_column("checkpoint", overflow="fold")
        table.add_column("disk", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        table.add_column("why", overflow="fold")
        for cp in report.checkpoints:
            label = cp.name + (" (current)" if cp.definition.current else "")
            if not cp.disks:
                table.add_row(_t(label), "-", _t("ok", "green"), _t("no disk has a bitmap"))
            for i, v in enumerate(cp.disks):
                table.add_row(
                    _t(label) if i == 0 else Text(""),
                    _t(v.disk),
                    _t(v.verdict, _VERDICT_STYLE.get(v.verdict, "")),
                    _t(v.reason),
                )
        parts.append(table)
    else:
        parts.append(Text("No checkpoints."))
    if report.orphans:
        table = section_table("Bitmaps no checkpoint names", pad_edge=False)
        table.add_column("disk", no_wrap=True)
        table.add_column("layer", justify="right", no_wrap=True)
        table.add_column("image", overflow="fold")
        table.add_column("bitmap", overflow="fold")
        table.add_column("flags", no_wrap=True)
        for o in report.orphans:
            table.add_row(
                _t(o.disk), str(o.index), _t(o.filename), _t(o.bitmap), ", ".join(o.flags) or "-"
            )
        parts.append(table)
    if report.findings:
        parts.append(Text("Files that could not be used", style="bold"))
        for f in report.findings:
            parts.append(Text.assemble("  ", ("error: ", "bold red"), printable(f.message)))
    if remedies and report.remedies:
        parts.append(remedies_view("Remedies", report.remedies))
    if result:
        code = report.exit_code
        style = "green" if code == 0 else ("yellow" if code in (4, 75) else "bold red")
        parts.append(Text(f"Result: {RESULTS.get(code, '?')} (exit {code})", style=style))
    return Group(*parts)


_DONE = {"recover": "recovered", "create": "created", "enable": "enabled"}
_PLANNED = {"recover": "recover", "create": "create", "enable": "enable"}

REPAIR_RESULTS = {
    "repaired": "repaired",
    "dry-run": "dry run: nothing was written",
    "nothing-to-do": "nothing repairable",
    "refused": "refused: nothing was written",
    "failed": "failed part way",
    "running": "running: nothing was written",
}


def _action_text(repair: BitmapRepair, *, done: bool) -> str:
    words = (_DONE if done else _PLANNED)[repair.action]
    detail = repair.mode
    if repair.action == "create" and repair.granularity:
        detail += f", granularity {repair.granularity}"
    return f"{words} ({detail})"


def repair_view(repair: RepairReport) -> RenderableType:
    """One domain's repair: what was (or would be) done per bitmap, then the domain after it."""
    from rich.console import Group
    from rich.text import Text

    shown = repair.shown
    parts: list[RenderableType] = [domain_view(shown, result=False, remedies=False)]
    done = repair.status in ("repaired", "failed")
    if repair.repairs:
        written = {i.filename for i in repair.images} if done else set()
        title = "Repair (dry run: nothing was written)" if repair.dry_run else "Repair"
        table = section_table(title, pad_edge=False)
        table.add_column("checkpoint", overflow="fold")
        table.add_column("disk", no_wrap=True)
        table.add_column("layer", justify="right", no_wrap=True)
        table.add_column("image", overflow="fold")
        table.add_column("was", no_wrap=True)
        table.add_column("done" if done else "plan", overflow="fold")
        for r in repair.repairs:
            happened = r.filename in written
            table.add_row(
                _t(r.checkpoint),
                _t(r.disk),
                str(r.layer),
                _t(r.filename),
                _t(r.problem, _VERDICT_STYLE.get(r.problem, "")),
                _t(
                    _action_text(r, done=happened),
                    "green" if happened else ("" if not done else "bold red"),
                ),
            )
        parts.append(table)
        if repair.references:
            for disk, path in repair.references.items():
                parts.append(_t(f"reference for {disk}: {path}"))
        for image in repair.images:
            parts.append(
                _t(
                    f"{image.filename}: {len(image.writes)} writes, "
                    f"{image.clusters_allocated} clusters allocated, {image.clusters_freed} freed"
                    + (" (would be)" if repair.dry_run else "")
                )
            )
    if repair.message:
        style = "cyan" if repair.status == "running" else "bold red"
        parts.append(_t(f"Repair {repair.status}: {repair.message}", style))
    remains = repair.remains
    if remains:
        title = "What remains for a person" if repair.status != "refused" else "Remedies"
        parts.append(remedies_view(title, remains))
    code = repair.exit_code
    style = "green" if code == 0 else ("yellow" if code in (4, 75) else "bold red")
    after = "after the repair: " if repair.status == "dry-run" else ""
    parts.append(
        Text(
            f"Result: {REPAIR_RESULTS.get(repair.status, repair.status)}; "
            f"{after}{RESULTS.get(code, '?')} (exit {code})",
            style=style,
        )
    )
    return Group(*parts)


def human(reports: Sequence[DomainReport | RepairReport]) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    from qbitmap.libvirt.repair import RepairReport

    parts: list[RenderableType] = []
    for i, report in enumerate(reports):
        if i:
            parts.append(Text(""))
        if isinstance(report, RepairReport):
            parts.append(repair_view(report))
        else:
            parts.append(domain_view(report))
    if len(reports) > 1:
        code = worst_exit_code(r.exit_code for r in reports)
        parts.append(Text(f"\nOver {len(reports)} domains: exit {code}", style="bold"))
    return Group(*parts)
