"""``qbitmap dump``: everything the image says about its bitmaps."""

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
    help="Show only this bitmap (repeatable).",
)
@click.option("--extents", is_flag=True, help="Also list the dirty byte ranges of each bitmap.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--lines",
    is_flag=True,
    help="Print the dirty ranges as 'START LENGTH' lines (bytes), for shell loops; "
    "a third column holds the bitmap name when more than one bitmap is shown.",
)
@click.option(
    "--backing-chain",
    is_flag=True,
    help="Also show every image below IMAGE in its backing chain; with --extents, "
    "the union of each bitmap's dirty ranges over the layers that have it.",
)
@click.pass_obj
def dump(
    ui: Ui,
    image: Path,
    names: tuple[str, ...],
    extents: bool,
    as_json: bool,
    lines: bool,
    backing_chain: bool,
) -> None:
    """Show the header, extensions and bitmaps of IMAGE, down to dirty ranges.

    Reads only and takes no lock, so it works on an image a running QEMU
    holds (what it shows may then be changing).  A bitmap flagged in-use is
    shown with its on-disk contents and a warning that they are stale.

    \b
    Examples:
      qbitmap dump disk.qcow2
      qbitmap dump --json --extents -b daily disk.qcow2 | jq .bitmaps[0].extents
      qbitmap dump --lines -b daily disk.qcow2 | while read start length; do ...; done
      qbitmap dump --backing-chain --extents -b cp1 overlay.qcow2

    Exit status: 0 success, 1 the image could not be read, 64 usage error,
    130 interrupted.
    """
    if as_json and lines:
        raise click.UsageError("--json and --lines are two output forms; choose one")
    if backing_chain:
        from qbitmap.commands._chain import dump_chain

        code = dump_chain(ui, image, names, extents, as_json, lines)
        allow_fast_exit()
        click.get_current_context().exit(code)
    from qbitmap.format import Image
    from qbitmap.inspect import dump_report

    require_image_file(image)
    with Image.open(image) as img:

        def writer_running() -> bool:
            # Asked only when a bitmap is in use: the probe tests QEMU's lock bytes and
            # takes no lock.
            from qbitmap import lockbytes

            return lockbytes.writer_present(lockbytes.probe(img.fd))

        report = dump_report(
            img,
            filename=str(image),
            names=names,
            with_extents=extents or lines,
            writer_running=writer_running,
        )
        for warning in report.warnings:
            ui.warning(warning)
        # The extents stream from the open image while they are written.
        if as_json:
            from qbitmap.render.dump import write_json

            sys.stdout.flush()
            write_json(sys.stdout.buffer, report)
            sys.stdout.buffer.flush()
        elif lines:
            from qbitmap.render.dump import write_lines

            sys.stdout.flush()
            write_lines(sys.stdout.buffer, report)
            sys.stdout.buffer.flush()
        else:
            from qbitmap.render.dump import write_human

            write_human(ui, report)
    allow_fast_exit()
