"""The console entry point: Ctrl-C is one line and exit 130 from the first instant.

The ``qbitmap`` script and ``python -m qbitmap`` start here.  This module
imports only ``signal``, ``sys`` and :mod:`qbitmap.interrupt` (``os``), so the handler is in
place before click, rich and numpy are imported (tens of milliseconds in which Python's
default handler would print a ``KeyboardInterrupt`` traceback).  While a
command runs, :mod:`qbitmap.cli` lets SIGINT raise ``KeyboardInterrupt`` so
that open images are closed and locks released on the way out, and puts
this handler back afterwards.

A ``recover --reference`` command line also starts the start-up pulls of
both files here (:func:`qbitmap.recover.prefetch.prefetch_command_line`),
before click's import, the first moment the paths are known.
"""

from __future__ import annotations

import signal
import sys

from qbitmap.interrupt import exit_interrupted


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGINT, exit_interrupted)
    if "recover" in sys.argv:
        # Before click and numpy load: the disks start reading both files of a
        # recover --reference meanwhile (standard library only; advice only).
        from qbitmap.recover.prefetch import prefetch_command_line

        prefetch_command_line(sys.argv[1:])
    from qbitmap.cli import main as cli_main

    cli_main()
