"""``qbitmap check``: the offline bitmap health check backup scripts run first."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from qbitmap.commands import QbitmapCommand, bitmap_option, output_option, require_image_file
from qbitmap.ui import Ui, allow_fast_exit

if TYPE_CHECKING:
    from qbitmap.check import CheckReport
    from qbitmap.commands._many import Outcome
    from qbitmap.render.prometheus import CheckedImage


@click.command(cls=QbitmapCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument(
    "images",
    nargs=-1,
    required=True,
    metavar="IMAGE...",
    type=click.Path(path_type=Path, readable=False),
)
@bitmap_option("Report only this bitmap (repeatable); image-wide findings are always reported.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image on stdout.")
@output_option
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print metrics per image and bitmap in the Prometheus text format (node_exporter's "
    "textfile collector) instead of the report.",
)
@click.option(
    "--backing-chain",
    is_flag=True,
    help="Check every image of IMAGE's backing chain and judge each bitmap name by "
    "libvirt's rule for a checkpoint bitmap.",
)
@click.pass_context
def check(
    ctx: click.Context,
    images: tuple[Path, ...],
    names: tuple[str, ...],
    as_json: bool,
    prometheus: bool,
    backing_chain: bool,
) -> None:
    """Validate the persistent bitmaps of each IMAGE the way QEMU loads them, and more.

    Reads only and takes no lock.  Every rule QEMU applies when it loads
    bitmaps is checked, plus what QEMU does not check: bitmap clusters inside
    the file, aligned, allocated and shared with nothing else, unique names,
    clean bits past the disk's end.  A bitmap left in use by a writer that
    stopped uncleanly is reported with what 'qbitmap recover' can do for it.
    Several images are checked in turn; one that cannot be read never stops
    the others.

    \b
    Examples:
      qbitmap check disk.qcow2
      qbitmap check --json -b daily disk.qcow2 | jq .bitmaps
      qbitmap check disk.qcow2 || echo "exit $?: do a full backup"
      qbitmap check --backing-chain overlay.qcow2
      qbitmap check --json /var/lib/libvirt/images/*.qcow2 | jq -c '{filename, exit_code}'
      qbitmap -q check --prometheus /var/lib/libvirt/images/*.qcow2 > qbitmap.prom.tmp

    Exit status: 0 every bitmap consistent, 1 could not check, 2 corruption
    anywhere in the image (or QEMU would refuse it), 3 leaked clusters only,
    4 stale bitmaps with sound metadata that recover can bring back, 75 a
    running writer holds the image (its bitmaps live in its memory); the
    first of 1, 75, 2, 4, 3 wins, over every image; 64 usage, 130
    interrupted.  With --json there is one JSON object per image for every
    status.
    """
    ui: Ui = ctx.obj if isinstance(ctx.obj, Ui) else Ui()
    if prometheus and as_json:
        raise click.UsageError("--prometheus and --json are two output forms; choose one")
    if prometheus and backing_chain:
        raise click.UsageError(
            "--prometheus reports images one by one: name each layer as an IMAGE instead of "
            "--backing-chain"
        )
    if prometheus:
        code = _check_prometheus(ui, images, names)
    elif backing_chain:
        from qbitmap.commands._chain import check_chain

        if len(images) == 1:
            code = check_chain(ui, images[0], names, as_json)
        else:
            code = _several(
                ui, images, lambda image: check_chain(ui, image, names, as_json), as_json
            )
    elif len(images) == 1:
        report = _check_one(images[0], names)
        _show(ui, report, as_json)
        code = report.exit_code
    else:

        def one(image: Path) -> int:
            report = _check_one(image, names)
            _show(ui, report, as_json)
            return report.exit_code

        code = _several(ui, images, one, as_json)
    # The images are closed and the reports written: skip the interpreter's teardown.
    allow_fast_exit()
    ctx.exit(code)


def _check_one(image: Path, names: tuple[str, ...]) -> CheckReport:
    from qbitmap.check import CheckReport, Finding, check_path
    from qbitmap.errors import ImageIOError

    try:
        require_image_file(image)
    except ImageIOError as exc:
        # Not an image file at all: reported like any file check cannot read.
        return CheckReport(str(image), [Finding("image-unreadable", str(exc))])
    return check_path(image, names=list(names) or None)


def _show(ui: Ui, report: CheckReport, as_json: bool) -> None:
    if report.exit_code == 1:
        from qbitmap.render.check import error_line

        ui.error(error_line(report) or f"{report.filename}: could not check the image")
    if as_json:
        from qbitmap.render.check import write_json

        write_json(sys.stdout, report)
    else:
        from qbitmap.render.check import human

        ui.print(human(report))


def _several(ui: Ui, images: tuple[Path, ...], one: Callable[[Path], int], as_json: bool) -> int:
    """Each image's report in turn (JSON Lines with --json), a warning per image not sound."""
    from qbitmap.commands._many import for_each_image, worst
    from qbitmap.render.check import verdict, write_failure_json

    def failed(outcome: Outcome) -> None:
        if as_json:
            write_failure_json(
                sys.stdout, str(outcome.image), outcome.exit_code, outcome.error or ""
            )
        else:
            from qbitmap.render.check import failure_human

            ui.print(failure_human(str(outcome.image), outcome.exit_code))

    first = True

    def each(image: Path) -> int:
        nonlocal first
        if not as_json and not first:
            ui.write("\n")
        first = False
        code = one(image)
        if code not in (0, 1):
            ui.warning(f"{image}: {verdict(code)} (exit {code})")
        return int(code)

    outcomes = for_each_image(ui, images, each, failed=failed)
    if not as_json:
        from qbitmap.render.check import several_human

        ui.write("\n")
        ui.print(several_human([(str(o.image), o.exit_code) for o in outcomes]))
    return worst(outcomes)


def _check_prometheus(ui: Ui, images: tuple[Path, ...], names: tuple[str, ...]) -> int:
    """Check every image, then write every metric family at once (the format groups them)."""
    from qbitmap.commands._many import for_each_image, worst
    from qbitmap.render.prometheus import checked_image, write_check_metrics

    measured: list[CheckedImage] = []

    def one(image: Path) -> int:
        report = _check_one(image, names)
        if report.exit_code == 1:
            from qbitmap.render.check import error_line

            ui.error(error_line(report) or f"{image}: could not check the image")
        measured.append(checked_image(report, _dirty_bytes(image, report), time.time()))
        return report.exit_code

    def failed(outcome: Outcome) -> None:
        from qbitmap.render.prometheus import failed_image

        measured.append(failed_image(str(outcome.image), outcome.exit_code, time.time()))

    # An image named twice would give every series twice, which Prometheus refuses.
    unique = tuple(dict.fromkeys(images))
    outcomes = for_each_image(ui, unique, one, failed=failed)
    write_check_metrics(sys.stdout, measured)
    return worst(outcomes)


def _dirty_bytes(image: Path, report: CheckReport) -> dict[int, int]:
    """Dirty bytes on disk of each bitmap whose data can be read, by directory index."""
    from qbitmap.errors import QbitmapError

    entries = [b.entry for b in report.bitmaps if b.entry is not None and b.status != "corrupt"]
    if not entries:
        return {}
    from qbitmap.format import Image
    from qbitmap.inspect import measure_dirty_bytes

    try:
        with Image.open(image) as img:
            return measure_dirty_bytes(img, entries)
    except (QbitmapError, OSError):
        return {}
