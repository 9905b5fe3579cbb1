"""One module per qbitmap command; each defines a click command of that name.

Every command is a :class:`QbitmapCommand`: before its body runs, the parsed
parameters are recorded where :mod:`qbitmap.cli` finds them when something
fails (which file to name, whether to answer in JSON).  Each body refuses a
file argument that is not a regular file or a block device with
:func:`require_image_file` before anything opens it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import click

from qbitmap.errors import ImageIOError

#: ``ctx.meta`` key of the running command's parsed parameters.
PARAMS_KEY = "qbitmap.params"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
)


def require_image_file(path: Path) -> None:
    """Refuse *path* (exit 1, one line naming it) unless it is a regular file or a block device.

    Only ``stat`` is used: opening a FIFO blocks until a writer appears, so
    the type is known before anything opens the file.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot open: {exc.strerror}") from exc
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise ImageIOError(f"{path}: is {kind}; an image is a regular file or a block device")


class QbitmapCommand(click.Command):
    """A qbitmap command: its parsed parameters recorded before the body runs."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[PARAMS_KEY] = dict(ctx.params)
        return super().invoke(ctx)
