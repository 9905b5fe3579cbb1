"""The console entry point: Ctrl-C is one line and exit 130 from the first instant.

The ``qbitmap`` script and ``python -m qbitmap`` start here.  This module
imports only the standard library and :mod:`qbitmap.errors`, so the handler below is in place before
click, rich and numpy are imported (tens of milliseconds in which Python's
default handler would print a ``KeyboardInterrupt`` traceback).  While a
command runs, :mod:`qbitmap.cli` lets SIGINT raise ``KeyboardInterrupt`` so
that open images are closed and locks released on the way out, and puts
this handler back afterwards.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

from qbitmap.errors import ExitCode

if TYPE_CHECKING:
    from types import FrameType


def exit_interrupted(signum: int | None = None, frame: FrameType | None = None) -> None:
    """Write ``qbitmap: interrupted`` on stderr and end the process with status 130 at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.write(2, b"qbitmap: interrupted\n")
    except OSError:
        pass
    os._exit(ExitCode.INTERRUPTED)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGINT, exit_interrupted)
    from qbitmap.cli import main as cli_main

    cli_main()
