"""The console entry point: Ctrl-C is one line and exit 130 from the first instant.

The ``qbitmap`` script and ``python -m qbitmap`` start here.  This module
imports only ``os`` and ``signal``, so the handler below is in place before
click, rich and numpy are imported (tens of milliseconds in which Python's
default handler would print a ``KeyboardInterrupt`` traceback).  While a
command runs, :mod:`qbitmap.cli` lets SIGINT raise ``KeyboardInterrupt`` so
that open images are closed and locks released on the way out, and puts
this handler back afterwards.
"""

from __future__ import annotations

import os
import signal

# ExitCode.INTERRUPTED; qbitmap.errors is not imported here because it imports typing,
# milliseconds before this module's handler could be in place.
INTERRUPTED = 130


def exit_interrupted(signum: int | None = None, frame: object = None) -> None:
    """Write ``qbitmap: interrupted`` on stderr and end the process with status 130 at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.write(2, b"qbitmap: interrupted\n")
    except OSError:
        pass
    os._exit(INTERRUPTED)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGINT, exit_interrupted)
    from qbitmap.cli import main as cli_main

    cli_main()
