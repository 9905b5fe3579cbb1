"""``qbitmap dump``: everything the image says about its bitmaps."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qbitmap.commands import QbitmapCommand, bitmap_option, output_option, require_image_file
from qbitmap.ui import Ui, allow_fast_exit, locale_is_utf8


@click.command(cls=QbitmapCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument(
    "images",
    nargs=-1,
    required=True,
    metavar="IMAGE...",
    type=click.Path(path_type=Path, readable=False),
)
@bitmap_option("Show only this bitmap (repeatable).")
@click.option("--extents", is_flag=True, help="Also list the dirty byte ranges of each bitmap.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image on stdout.")
@output_option
@click.option(
    "--lines",
    is_flag=True,
    help="Print the dirty ranges as 'START LENGTH' lines (bytes), for shell loops; "
    "a third column holds the bitmap name when more than one bitmap is shown.",
)
@click.option(
    "--map",
    "draw_map",
    is_flag=True,
    help="Draw each bitmap's map (where on the disk its dirty bytes lie) even when stdout "
    "is not a terminal; on a terminal it is always drawn.",
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
    images: tuple[Path, ...],
    names: tuple[str, ...],
    extents: bool,
    as_json: bool,
    lines: bool,
    draw_map: bool,
    backing_chain: bool,
) -> None:
    """Show the header, extensions and bitmaps of each IMAGE, down to dirty ranges.

    Reads only and takes no lock, so it works on an image a running QEMU
    holds (what it shows may then be changing).  A bitmap flagged in-use is
    shown with its on-disk contents and a warning that they are stale.  On a
    terminal each bitmap's map shows where on the disk its dirty bytes lie.
    Several images are shown in turn; one that cannot be read never stops
    the others.

    \b
    Examples:
      qbitmap dump disk.qcow2
      qbitmap dump --json --extents -b daily disk.qcow2 | jq .bitmaps[0].extents
      qbitmap dump --lines -b daily disk.qcow2 | while read start length; do ...; done
      qbitmap dump --backing-chain --extents -b cp1 overlay.qcow2
      qbitmap dump --json /var/lib/libvirt/images/*.qcow2 | jq -c '{filename, n: (.bitmaps|length)}'

    Exit status: 0 success, 1 an image could not be read (the others are
    still shown), 64 usage error, 130 interrupted.
    """
    if as_json and lines:
        raise click.UsageError("--json and --lines are two output forms; choose one")
    if draw_map and (as_json or lines):
        raise click.UsageError("--map draws the tables' maps: not with --json or --lines")
    if draw_map and backing_chain:
        raise click.UsageError("--map draws one image's bitmaps: not with --backing-chain")
    if lines and len(images) > 1:
        raise click.UsageError(
            "--lines prints ranges without file names: give one IMAGE (or use --json)"
        )
    map_width = None
    shades = ""
    if not (as_json or lines or backing_chain) and (draw_map or ui.stdout_is_terminal):
        from qbitmap.render.density import ASCII_SHADES, UTF8_SHADES

        map_width = ui.width
        shades = UTF8_SHADES if locale_is_utf8() else ASCII_SHADES

    def one(image: Path) -> int:
        if backing_chain:
            from qbitmap.commands._chain import dump_chain

            return dump_chain(ui, image, names, extents, as_json, lines)
        _dump_one(ui, image, names, extents, as_json, lines, map_width, shades, len(images) > 1)
        return 0

    if len(images) == 1:
        code = one(images[0])
    else:
        from qbitmap.commands._many import for_each_image, worst

        first = True

        def each(image: Path) -> int:
            nonlocal first
            if not first and not as_json:
                ui.write("\n")
            first = False
            return one(image)

        code = worst(for_each_image(ui, images, each))
    allow_fast_exit()
    click.get_current_context().exit(code)


def _dump_one(
    ui: Ui,
    image: Path,
    names: tuple[str, ...],
    extents: bool,
    as_json: bool,
    lines: bool,
    map_width: int | None,
    shades: str,
    several: bool,
) -> None:
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
            # Among several images, a warning says which one it is about.
            ui.warning(f"{image}: {warning}" if several else warning)
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

            write_human(ui, report, map_width=map_width, shades=shades)
