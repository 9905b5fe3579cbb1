"""``qbitmap check``: the offline bitmap health check backup scripts run first."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qbitmap.commands import QbitmapCommand, require_image_file
from qbitmap.ui import Ui, allow_fast_exit


@click.command(cls=QbitmapCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", type=click.Path(path_type=Path, readable=False))
@click.option(
    "-b",
    "--bitmap",
    "names",
    multiple=True,
    metavar="NAME",
    help="Report only this bitmap (repeatable); image-wide findings are always reported.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--backing-chain",
    is_flag=True,
    help="Check every image of IMAGE's backing chain and judge each bitmap name by "
    "libvirt's rule for a checkpoint bitmap.",
)
@click.pass_context
def check(
    ctx: click.Context, image: Path, names: tuple[str, ...], as_json: bool, backing_chain: bool
) -> None:
    """Validate the persistent bitmaps of IMAGE the way QEMU loads them, and more.

    Reads only and takes no lock.  Every rule QEMU applies when it loads
    bitmaps is checked, plus what QEMU does not check: bitmap clusters inside
    the file, aligned, allocated and shared with nothing else, unique names,
    clean bits past the disk's end.  A bitmap left in use by a writer that
    stopped uncleanly is reported with what 'qbitmap recover' can do for it.

    \b
    Examples:
      qbitmap check disk.qcow2
      qbitmap check --json -b daily disk.qcow2 | jq .bitmaps
      qbitmap check disk.qcow2 || echo "exit $?: do a full backup"
      qbitmap check --backing-chain overlay.qcow2

    Exit status: 0 every bitmap consistent, 1 could not check, 2 corruption
    anywhere in the image (or QEMU would refuse it), 3 leaked clusters only,
    4 stale bitmaps with sound metadata that recover can bring back, 75 a
    running writer holds the image (its bitmaps live in its memory); the
    first of 1, 75, 2, 4, 3 wins; 64 usage, 130 interrupted.  With --json
    there is one JSON object for every status.
    """
    from qbitmap.check import CheckReport, Finding, check_path
    from qbitmap.errors import ImageIOError

    ui: Ui = ctx.obj if isinstance(ctx.obj, Ui) else Ui()
    if backing_chain:
        from qbitmap.commands._chain import check_chain

        code = check_chain(ui, image, names, as_json)
        allow_fast_exit()
        ctx.exit(code)
    try:
        require_image_file(image)
    except ImageIOError as exc:
        # Not an image file at all: reported like any file check cannot read.
        report = CheckReport(str(image), [Finding("image-unreadable", str(exc))])
    else:
        report = check_path(image, names=list(names) or None)
    if report.exit_code == 1:
        from qbitmap.render.check import error_line

        ui.error(error_line(report) or f"{image}: could not check the image")
    if as_json:
        from qbitmap.render.check import write_json

        write_json(sys.stdout, report)
    else:
        from qbitmap.render.check import human

        ui.print(human(report))
    # The image is closed and the report written: skip the interpreter's teardown.
    allow_fast_exit()
    ctx.exit(report.exit_code)
