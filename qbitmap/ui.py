"""The one place that writes to the terminal.

stdout carries results (tables, JSON, lines); stderr carries diagnostics
(errors, warnings, progress).  rich is imported only when something is
rendered for a person, so machine output (``--json``, ``--lines``) starts
fast.  Consoles are built with ``markup=False``/``highlight=False``: bitmap
names come from the image and must never be read as rich markup.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import TYPE_CHECKING, Any, Self, TextIO

from qbitmap.render import printable

if TYPE_CHECKING:
    from rich.console import Console


_fast_exit = False

# Width used to measure a renderable's natural minimum, free of the terminal's width.
_UNBOUNDED_WIDTH = 1 << 16


def allow_fast_exit() -> None:
    """Let the process end without interpreter teardown once the command returns.

    For commands that have written and closed everything they opened (``dump``,
    ``check``, ``recover``): :func:`qbitmap.cli.main` then flushes stdout/stderr
    and calls ``os._exit``, saving the milliseconds Python spends freeing numpy
    and every module.
    Only the console entry point honours it; in-process callers are unaffected.
    """
    global _fast_exit
    _fast_exit = True


def fast_exit_allowed() -> bool:
    return _fast_exit


@functools.cache
def _console_class() -> type[Console]:
    from rich.console import Console

    class QbitmapConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich's own answer is SystemExit(1); a closed stdout is not a failure, and
            # qbitmap.cli handles it the same way for every output form.
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return QbitmapConsole


def _initial_environment() -> dict[str, str]:
    """The environment the process was started with.

    Python changes its own environment at start-up under the C locale
    (PEP 538 sets LC_CTYPE=C.UTF-8), which would hide that the user's locale
    is not UTF-8; the kernel keeps what the process was given.
    """
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[os.fsdecode(key)] = os.fsdecode(value)
    return out


def locale_is_utf8(environ: dict[str, str] | None = None) -> bool:
    """Whether the user's locale (LC_ALL, else LC_CTYPE, else LANG) is UTF-8; unset is C."""
    env = _initial_environment() if environ is None else environ
    for key in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(key)
        if value:
            return value.lower().replace("-", "").endswith("utf8") or ".utf8@" in (
                value.lower().replace("-", "")
            )
    return False


def _wants_color(stream: TextIO, color: bool | None) -> bool:
    if color is not None:
        return color
    if os.environ.get("NO_COLOR"):
        return False
    return stream.isatty()


class Ui:
    """Output policy for one invocation: colour, verbosity, the two consoles."""

    def __init__(self, *, color: bool | None = None, quiet: bool = False) -> None:
        self.color = color
        self.quiet = quiet
        self._out: Console | None = None
        self._err: Console | None = None

    @staticmethod
    def _console(stream: TextIO, color: bool, width: int | None = None) -> Console:
        return _console_class()(
            file=stream,
            markup=False,
            emoji=False,
            highlight=False,
            force_terminal=color,
            no_color=not color,
            color_system="auto" if color else None,
            soft_wrap=False,
            width=width,
        )

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = self._console(sys.stdout, _wants_color(sys.stdout, self.color))
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = self._console(sys.stderr, _wants_color(sys.stderr, self.color))
        return self._err

    @property
    def stderr_is_terminal(self) -> bool:
        return sys.stderr.isatty()

    @property
    def stdout_is_terminal(self) -> bool:
        return sys.stdout.isatty()

    @property
    def width(self) -> int:
        """Columns of stdout: the terminal's, else COLUMNS, else 80."""
        return self.out.width

    def print(self, *renderables: Any) -> None:
        """Render rich objects on stdout, never narrower than their measured minimum.

        On a console narrower than that minimum rich would cut cells with an
        ellipsis; names sit in no-wrap columns sized by
        :func:`qbitmap.render.keep_whole`, so the lines are made longer instead
        (a terminal wraps them, a pipe keeps them whole).
        """
        from rich.measure import Measurement

        console = self.out
        unbounded = console.options.update_width(_UNBOUNDED_WIDTH)
        need = max((Measurement.get(console, unbounded, r).minimum for r in renderables), default=0)
        if need > console.width:
            console = self._console(sys.stdout, not console.no_color, width=need)
        console.print(*renderables)

    def write(self, text: str) -> None:
        """Write plain text on stdout, untouched."""
        sys.stdout.write(text)

    # Messages quote bitmap names and file names, which may hold escape sequences or
    # newlines: printable() keeps each message one inert line.
    def error(self, message: str) -> None:
        sys.stderr.write(f"qbitmap: error: {printable(message)}\n")
        sys.stderr.flush()

    def warning(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"qbitmap: warning: {printable(message)}\n")
            sys.stderr.flush()

    def info(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"qbitmap: {printable(message)}\n")
            sys.stderr.flush()

    def progress(self, description: str, total: int | None) -> Any:
        """A progress bar on a terminal's stderr; a silent stand-in elsewhere."""
        if self.quiet or not self.stderr_is_terminal:
            return NullProgress()
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        return _RichProgress(
            Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.err,
                transient=True,
            ),
            printable(description),
            total,
        )


class NullProgress:
    """Progress reporting that shows nothing (pipes, --quiet)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, amount: int) -> None:
        return None


class _RichProgress:
    def __init__(self, progress: Any, description: str, total: int | None) -> None:
        self._progress = progress
        self._description = description
        self._total = total
        self._task: Any = None

    def __enter__(self) -> Self:
        self._progress.__enter__()
        self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def advance(self, amount: int) -> None:
        self._progress.advance(self._task, amount)
