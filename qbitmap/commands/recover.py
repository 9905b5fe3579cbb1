"""``qbitmap recover``: bring in-use bitmaps back into service, in place, crash-safely."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qbitmap.commands import QbitmapCommand, bitmap_option, output_option, require_image_file
from qbitmap.recover.modes import MODES
from qbitmap.ui import Ui, allow_fast_exit


@click.command(cls=QbitmapCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", type=click.Path(path_type=Path, readable=False))
@bitmap_option("Recover only this bitmap (repeatable; default: every in-use bitmap).")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="auto",
    show_default=True,
    help="full: every bit set; reference: on-disk bits plus every granule that differs from "
    "--reference; level: from a trusted consistency-level record; auto: level if a trusted "
    "record exists, else reference if --reference is given, else refuse.",
)
@click.option(
    "--reference",
    "reference",
    type=click.Path(path_type=Path, readable=False),
    metavar="FILE",
    help="Guest data as of the bitmap's last clear point (the last backup): raw or qcow2 "
    "(with backing chain).  Implies --mode reference unless a trusted record wins in auto mode.",
)
@click.option(
    "--reference-format",
    type=click.Choice(("raw", "qcow2")),
    default=None,
    help="Format of --reference (default: probed from its first bytes).",
)
@click.option(
    "--drop-broken",
    is_flag=True,
    help="Remove bitmaps whose metadata is corrupt so that QEMU opens the image again, freeing "
    "only clusters owned by them alone.",
)
@click.option(
    "--keep-leaks",
    is_flag=True,
    help="Do not free leaked clusters (refcount above zero, nothing references them), e.g. "
    "those a killed recover left behind.",
)
@click.option(
    "--dry-run", "-n", is_flag=True, help="Print what would be written where; write nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report on stdout.")
@output_option
@click.pass_obj
def recover(
    ui: Ui,
    image: Path,
    names: tuple[str, ...],
    mode: str,
    reference: Path | None,
    reference_format: str | None,
    drop_broken: bool,
    keep_leaks: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Rewrite in-use bitmaps of IMAGE so that QEMU accepts them again.

    A recovered bitmap still marks every change made since it was last
    cleared, so incremental backup chains built on it survive.  New data,
    tables and directory go to new clusters; one header write switches to
    them; only then are the old clusters freed.  A kill at any instant
    leaves an image QEMU opens, each bitmap either still in use or fully
    recovered; running recover again finishes the job.  QEMU's lock bytes
    are held for the whole run.

    \b
    Examples:
      qbitmap recover --reference last-backup.qcow2 disk.qcow2
      qbitmap recover --mode full -b daily disk.qcow2
      qbitmap recover --mode level --dry-run disk.qcow2
      qbitmap recover --json --reference backup.raw disk.qcow2 | jq .bitmaps

    Exit status: 0 recovered or nothing to do, 1 failed (or no mode applies:
    choose --mode full, --reference FILE or --mode level), 2 refused (corrupt
    metadata), 64 usage error, 75 the image is in use, 130 interrupted.  With
    --json there is one JSON object for every status.
    """
    if mode in ("full", "level") and reference is not None:
        raise click.UsageError(f"--reference cannot be combined with --mode {mode}")
    if mode == "reference" and reference is None:
        raise click.UsageError("--mode reference needs --reference FILE")
    if reference_format is not None and reference is None:
        raise click.UsageError("--reference-format needs --reference FILE")
    require_image_file(image)
    if reference is not None:
        require_image_file(reference)
        # Before the engine's imports: the disks start reading both files meanwhile.
        from qbitmap.recover.prefetch import prefetch_heads

        prefetch_heads((image, reference))
    from qbitmap.recover import Options
    from qbitmap.recover import recover as run

    options = Options(
        names=names,
        mode=mode,
        reference=reference,
        reference_format=reference_format,
        drop_broken=drop_broken,
        dry_run=dry_run,
        reclaim_leaks=not keep_leaks,
    )
    report = run(image, options, progress_factory=ui.progress, warn=ui.warning)
    if as_json:
        from qbitmap.render.recover import write_json

        write_json(sys.stdout, report)
    else:
        from qbitmap.render.recover import human

        ui.print(human(report))
    # The session is closed (every flush done, locks released) and the report written:
    # skip the interpreter's teardown.
    allow_fast_exit()
    click.get_current_context().exit(report.exit_code)
