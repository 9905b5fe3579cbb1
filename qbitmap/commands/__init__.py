"""One module per qbitmap command; each defines a click command of that name.

Every command is a :class:`QbitmapCommand`: before its body runs, the parsed
parameters are recorded where :mod:`qbitmap.cli` finds them when something
fails (which file to name, whether to answer in JSON).  Each body refuses a
file argument that is not a regular file or a block device with
:func:`require_image_file` before anything opens it.

Options several commands share are defined here once: ``--output``
(qemu-img's spelling of ``--json``) and ``-b/--bitmap``, whose shell
completion offers the bitmap names of the images already on the command
line.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from qbitmap.imagefile import require_image_file

__all__ = ["PARAMS_KEY", "QbitmapCommand", "require_image_file"]

F = TypeVar("F", bound=Callable[..., Any])

#: ``ctx.meta`` key of the running command's parsed parameters.
PARAMS_KEY = "qbitmap.params"


class QbitmapCommand(click.Command):
    """A qbitmap command: its parsed parameters recorded before the body runs.

    ``--output`` is folded into ``as_json`` here, so a command body sees one
    parameter whichever spelling was used.
    """

    def invoke(self, ctx: click.Context) -> Any:
        output = ctx.params.pop("output", None)
        if output == "json":
            ctx.params["as_json"] = True
        elif output == "human" and ctx.params.get("as_json"):
            raise click.UsageError("--output=human and --json ask for two output forms; choose one")
        ctx.meta[PARAMS_KEY] = dict(ctx.params)
        return super().invoke(ctx)


def output_option(function: F) -> F:
    """``--output=human|json``: ``--output=json`` is ``--json``, as qemu-img spells it."""
    return click.option(
        "--output",
        type=click.Choice(("human", "json")),
        default=None,
        metavar="human|json",
        help="Output form: json is the same as --json (qemu-img's spelling); human, the "
        "default, is the tables.",
    )(function)


def complete_bitmap_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of ``-b``: the bitmap names of the images already on the command line.

    Completion runs on every Tab press, on whatever the line names: it never
    raises and never prints.  A file that is not a regular file or a block
    device is not opened (a FIFO would block); a missing, unreadable or
    damaged image offers nothing.  Names that are not printable or hold
    whitespace are left out: a shell would print their escape sequences, or
    split them into several words.
    """
    try:
        images = _images_on_line(ctx)
    except Exception:  # noqa: BLE001 -- completion offers nothing rather than fail
        return []
    names: list[str] = []
    for image in images:
        # Completion offers nothing for an image it cannot read, rather than fail.
        with contextlib.suppress(Exception):
            names.extend(_bitmap_names(Path(image)))
    return [
        name
        for name in dict.fromkeys(names)
        if name.startswith(incomplete) and name.isprintable() and not any(c.isspace() for c in name)
    ]


def _images_on_line(ctx: click.Context) -> list[Path]:
    """The images already on the command line being completed."""
    images = ctx.params.get("images") or ctx.params.get("image")
    if images:
        return [Path(p) for p in (images if isinstance(images, (tuple, list)) else (images,))]
    # A trailing "-b" still waiting for its value stops click's parsing before the
    # positional arguments are stored: parse the words before it again, without it.
    from click.shell_completion import get_completion_class

    root = ctx.find_root()
    if root.info_name is None:
        return []
    # click's name for the variable that asks for completion: _QBITMAP_COMPLETE=bash_complete.
    variable = f"_{root.info_name.replace('-', '_').replace('.', '_')}_COMPLETE".upper()
    shell = os.environ.get(variable, "").partition("_")[0]
    completion = get_completion_class(shell)
    if completion is None:
        return []
    args, _incomplete = completion(root.command, {}, root.info_name, "").get_completion_args()
    if ctx.info_name not in args:
        return []
    words = args[args.index(ctx.info_name) + 1 :]
    if words and words[-1].startswith("-"):
        words = words[:-1]
    sub = ctx.command.make_context(
        ctx.info_name, list(words), parent=ctx.parent, resilient_parsing=True
    )
    images = sub.params.get("images") or sub.params.get("image")
    if not images:
        return []
    return [Path(p) for p in (images if isinstance(images, (tuple, list)) else (images,))]


def _bitmap_names(path: Path) -> list[str]:
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return []
    from qbitmap.format import Image

    names = []
    with Image.open(path) as image:
        for entry in image.read_directory().entries:
            try:
                # What -b matches: the name as QEMU knows it.
                names.append(entry.qemu_name.decode("utf-8"))
            except UnicodeDecodeError:
                continue
    return names


def bitmap_option(help_text: str) -> Callable[[F], F]:
    """``-b/--bitmap NAME`` (repeatable), completed from the images on the command line."""
    return click.option(
        "-b",
        "--bitmap",
        "names",
        multiple=True,
        metavar="NAME",
        help=help_text,
        shell_complete=complete_bitmap_names,
    )
