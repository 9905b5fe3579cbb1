"""Several images in one run of ``dump`` or ``check``: each image in turn, the worst status last.

One image's failure (unreadable, damaged, a FIFO, a bitmap name it lacks)
is one line on stderr naming it and never stops the others.  With a single
image nothing here is used: its errors end the run through
:mod:`qbitmap.cli` as they always have (a bitmap name the image lacks is a
usage error, 64).  With several, a ``-b`` name one image lacks is a fact
about that image, not a mistake on the command line: that image could not
be read as asked (1).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from qbitmap.errors import ExitCode, QbitmapError
from qbitmap.ui import Ui


@dataclass(frozen=True)
class Outcome:
    """How one image of several ended."""

    image: Path
    exit_code: int
    #: The error line (without ``qbitmap: error:``) when the image could not be read.
    error: str | None = None


def _named(image: Path, message: str) -> str:
    return message if str(image) in message else f"{image}: {message}"


def _debug() -> bool:
    import os

    ctx = click.get_current_context(silent=True)
    root = None if ctx is None else ctx.find_root()
    return bool(root is not None and root.meta.get("qbitmap.debug")) or (
        os.environ.get("QBITMAP_DEBUG") == "1"
    )


def for_each_image(
    ui: Ui,
    images: Sequence[Path],
    one: Callable[[Path], int],
    *,
    failed: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run *one* on every image in turn; an image's failure is an outcome, not the end.

    *one* writes the image's report and returns its exit status.  When it
    raises, the error is one ``qbitmap: error:`` line naming the image (its
    status 1, or the error's own: 75 for a held image), *failed* is called
    (``check --json`` writes the image's JSON object there), and the next
    image follows.  Ctrl-C and a closed stdout still end the run.
    """
    outcomes = []
    for image in images:
        try:
            outcomes.append(Outcome(image, one(image)))
            continue
        except QbitmapError as exc:
            code = int(exc.exit_code)
            if code == ExitCode.USAGE:
                code = int(ExitCode.FAILED)
            message = _named(image, str(exc))
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
                raise
            if _debug():
                raise
            code, message = int(ExitCode.FAILED), _named(image, f"{type(exc).__name__}: {exc}")
        except MemoryError as exc:
            if _debug():
                raise
            code, message = int(ExitCode.FAILED), _named(image, f"MemoryError: {exc}")
        except Exception as exc:
            if _debug():
                raise
            code = int(ExitCode.FAILED)
            message = _named(
                image,
                f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for details",
            )
        outcome = Outcome(image, code, message)
        ui.error(message)
        if failed is not None:
            failed(outcome)
        outcomes.append(outcome)
    return outcomes


def worst(outcomes: Sequence[Outcome]) -> int:
    """The status of the whole run: the first of 1, 75, 2, 4, 3 among the images', else 0."""
    from qbitmap.check.chain import worst_exit_code

    return worst_exit_code(o.exit_code for o in outcomes)
