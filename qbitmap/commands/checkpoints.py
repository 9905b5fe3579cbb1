"""``qbitmap checkpoints``: libvirt's view of a domain's checkpoints, offline and read-only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qbitmap.ui import Ui, allow_fast_exit

# The same as qbitmap.libvirt.DEFAULT_*; spelt out so that registering the command imports nothing.
DEFAULT_CONFIG_DIR = "/etc/libvirt/qemu"
DEFAULT_CHECKPOINT_DIR = "/var/lib/libvirt/qemu/checkpoint"


def _safe_domain_name(name: str) -> str:
    # The name becomes a file name in two directories.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise click.UsageError(f"{name!r} is not a domain name")
    return name


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("domain", required=False)
@click.option("--all", "all_domains", is_flag=True, help="Every domain defined on the host.")
@click.option(
    "--domain-xml",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Read the domain definition from FILE ('virsh dumpxml' output) instead of the "
    "config directory.",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_DIR,
    show_default=True,
    metavar="DIR",
    help="Where libvirt keeps persistent domain definitions (DOMAIN.xml).",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CHECKPOINT_DIR,
    show_default=True,
    metavar="DIR",
    help="Where libvirt keeps checkpoint metadata (DIR/DOMAIN/NAME.xml).",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Make every repairable checkpoint usable again, in place (domain shut off): recover "
    "in-use bitmaps, create missing ones, re-enable disabled ones, every change marked.",
)
@click.option(
    "--reference",
    "references",
    multiple=True,
    metavar="DISK=FILE",
    help="With --repair: FILE holds disk DISK's guest data as of the newest checkpoint (a "
    "restore of the backup chain), so that repaired bitmaps mark only what changed "
    "(repeatable, one per disk).",
)
@click.option(
    "--dry-run", "-n", is_flag=True, help="With --repair: print what would be done; write nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def checkpoints(
    ctx: click.Context,
    domain: str | None,
    all_domains: bool,
    domain_xml: Path | None,
    config_dir: Path,
    checkpoint_dir: Path,
    repair: bool,
    references: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Say, for each checkpoint of DOMAIN and each disk, whether libvirt will use it.

    Reads libvirt's files (the domain's persistent definition and its
    checkpoint metadata) and the disks' backing chains, and applies
    libvirt's rule for a checkpoint bitmap: present in the top image, in
    consecutive layers only, and in every layer recording and not in use.
    Reports bitmaps no checkpoint names, and a command line to remedy each
    problem.  Without --repair it never writes; for a shut-off domain (a
    running one holds its disks: libvirt's own view is authoritative then).

    --repair makes every repairable checkpoint usable again so that the
    backup chain survives: each repaired bitmap marks at least every change
    made since its checkpoint.  It writes only the disk images, crash-safely
    and under QEMU's lock bytes, never libvirt's files; if any image refuses
    (as 'qbitmap recover' would), nothing is written.

    \b
    Examples:
      qbitmap checkpoints vm1
      qbitmap checkpoints vm1 --repair --dry-run
      qbitmap checkpoints vm1 --repair --reference vda=/restore/vda.qcow2
      qbitmap checkpoints --all --json | jq '.domains[] | {domain, exit_code}'
      virsh dumpxml vm1 > vm1.xml; qbitmap checkpoints --domain-xml vm1.xml

    Exit status: 0 every checkpoint usable, 1 could not read, 2 some
    checkpoint unusable and not repairable here (or --repair refused:
    nothing written), 4 every problem repairable by --repair, 75 the domain
    is running, 64 usage; the first of 1, 75, 2, 4 wins.
    """
    from qbitmap.libvirt import (
        DomainReport,
        Finding,
        ImageCache,
        XmlProblem,
        domain_files,
        examine_domain,
        examine_domain_files,
        read_domain,
    )

    ui: Ui = ctx.obj if isinstance(ctx.obj, Ui) else Ui()
    if all_domains and (domain is not None or domain_xml is not None):
        raise click.UsageError("--all examines every domain: give no DOMAIN or --domain-xml")
    if not all_domains and domain is None and domain_xml is None:
        raise click.UsageError("name a DOMAIN, or give --domain-xml FILE or --all")
    if domain is not None:
        _safe_domain_name(domain)
    if not repair and (references or dry_run):
        raise click.UsageError("--reference and --dry-run go with --repair")
    if references and all_domains:
        raise click.UsageError("--reference names a disk of one domain: not with --all")
    cache = ImageCache()
    reports: list[DomainReport] = []
    if all_domains:
        try:
            files = domain_files(config_dir)
        except OSError as exc:
            ui.error(f"{config_dir}: cannot list domain definitions: {exc.strerror}")
            ctx.exit(1)
        reports = examine_domain_files(files, checkpoint_dir=checkpoint_dir, cache=cache)
    elif domain_xml is not None:
        try:
            definition = read_domain(domain_xml)
        except XmlProblem as exc:
            report = DomainReport(domain or domain_xml.stem, str(domain_xml), "-")
            report.findings.append(Finding(exc.path, str(exc)))
            reports.append(report)
        else:
            if domain is not None and definition.name != domain:
                raise click.UsageError(
                    f"{domain_xml} defines domain {definition.name!r}, not {domain!r}"
                )
            _safe_domain_name(definition.name)
            reports.append(examine_domain(definition, checkpoint_dir=checkpoint_dir, cache=cache))
    else:
        assert domain is not None
        path = config_dir / f"{domain}.xml"
        if not config_dir.is_dir():
            ui.error(f"{config_dir}: no such directory (is this a libvirt host? see --config-dir)")
            ctx.exit(1)
        if not path.exists():
            raise click.UsageError(f"no domain named {domain!r} is defined (no {path})")
        reports.extend(examine_domain_files([path], checkpoint_dir=checkpoint_dir, cache=cache))
    results: list[Any] = list(reports)
    if repair:
        results = _repair(ui, reports, references, checkpoint_dir, dry_run=dry_run)
    if as_json:
        from qbitmap.render.checkpoints import running_message, write_json

        write_json(sys.stdout, results, all_domains=all_domains)
        for report in reports:
            if report.running:
                ui.warning(running_message(report))
    else:
        from qbitmap.render.checkpoints import human

        ui.print(human(results))
    for report in reports:
        for finding in report.findings:
            ui.warning(finding.message)
    from qbitmap.check.chain import worst_exit_code

    allow_fast_exit()
    ctx.exit(worst_exit_code(r.exit_code for r in results))


def _repair(
    ui: Ui,
    reports: list[Any],
    references: tuple[str, ...],
    checkpoint_dir: Path,
    *,
    dry_run: bool,
) -> list[Any]:
    """Each readable domain's repair report (an unreadable definition keeps its diagnosis)."""
    from qbitmap.libvirt import XmlProblem, read_domain
    from qbitmap.libvirt.repair import parse_references, repair_domain

    out: list[Any] = []
    for report in reports:
        try:
            definition = read_domain(report.definition) if report.definition else None
        except XmlProblem:
            definition = None
        if definition is None:
            out.append(report)
            continue
        try:
            refs = parse_references(references, definition)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        out.append(
            repair_domain(
                definition,
                report,
                checkpoint_dir=checkpoint_dir,
                references=refs,
                dry_run=dry_run,
                progress_factory=ui.progress,
                warn=ui.warning,
            )
        )
    return out
