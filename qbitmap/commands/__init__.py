"""One module per qbitmap command; each defines a click command of that name.

Every command is a :class:`QbitmapCommand`: before its body runs, the parsed
parameters are recorded where :mod:`qbitmap.cli` finds them when something
fails (which file to name, whether to answer in JSON).  Each body refuses a
file argument that is not a regular file or a block device with
:func:`require_image_file` before anything opens it.
"""

from __future__ import annotations

from typing import Any

import click

from qbitmap.imagefile import require_image_file

__all__ = ["PARAMS_KEY", "QbitmapCommand", "require_image_file"]

#: ``ctx.meta`` key of the running command's parsed parameters.
PARAMS_KEY = "qbitmap.params"


class QbitmapCommand(click.Command):
    """A qbitmap command: its parsed parameters recorded before the body runs."""

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta[PARAMS_KEY] = dict(ctx.params)
        return super().invoke(ctx)
