"""``qbitmap dump``: everything the image says about its bitmaps."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qbitmap.errors import UsageError
from qbitmap.ui import Ui


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
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
@click.pass_obj
def dump(ui: Ui, image: Path, names: tuple[str, ...], extents: bool, as_json: bool, lines: bool) -> None:
    """Show the header, extensions and bitmaps of IMAGE, down to dirty ranges.

    Reads only and takes no lock, so it works on an image a running QEMU
    holds (what it shows may then be changing).  A bitmap flagged in-use is
    shown with its on-disk contents and a warning that they are stale.

    \b
    Examples:
      qbitmap dump disk.qcow2
      qbitmap dump --json --extents -b daily disk.qcow2 | jq .bitmaps[0].extents
      qbitmap dump --lines -b daily disk.qcow2 | while read start length; do ...; done

    Exit status: 0 success, 1 the image could not be read, 64 usage error.
    """
    from qbitmap import inspect
    from qbitmap.format import Image

    if as_json and lines:
        raise click.UsageError("--json and --lines are two output forms; choose one")
    with Image.open(image) as img:
        if img.extension_error is not None:
            raise img.extension_error
        directory = img.read_directory()
        if directory.error is not None:
            raise directory.error
        entries = list(directory.entries)
        if names:
            known = {e.display_name for e in entries}
            missing = [n for n in names if n not in known]
            if missing:
                raise UsageError(f"{image}: no bitmap named {missing[0]!r}")
            entries = [e for e in entries if e.display_name in names]
        info = {
            "filename": str(image),
            "virtual_size": img.virtual_size,
            "cluster_size": img.cluster_size,
            "version": img.header.version,
            "header": inspect.header_dict(img),
            "features": inspect.feature_words(img),
            "extensions": [inspect.extension_dict(img, ext) for ext in img.extensions],
            "bitmaps": [],
        }
        if img.header.backing_file_offset:
            raw = img.pread(img.header.backing_file_offset, min(img.header.backing_file_size, 1023))
            info["backing_file"] = raw.decode("utf-8", "backslashreplace")
        want_extents = extents or lines
        all_extents: dict[str, list[tuple[int, int]]] = {}
        for entry in entries:
            view = inspect.BitmapView(img, entry)
            summary = view.summary()
            total, runs = view.dirty_and_extents()
            summary["dirty_bytes"] = total
            info["bitmaps"].append(summary)
            if want_extents:
                all_extents[entry.display_name] = runs
            if entry.in_use:
                ui.warning(
                    f"bitmap {entry.display_name!r} is in use (not closed cleanly): its on-disk "
                    "contents are stale"
                )
    if as_json:
        from qbitmap.render.dump import write_json

        write_json(sys.stdout, info, all_extents if want_extents else None)
    elif lines:
        from qbitmap.render.dump import write_lines

        write_lines(sys.stdout, all_extents, with_names=len(all_extents) > 1)
    else:
        from qbitmap.render.dump import human

        ui.print(human(info, all_extents))
