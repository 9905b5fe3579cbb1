"""Ctrl-C ends qbitmap at once: one line, exit status 130, no traceback.

Imports only ``os`` and ``signal``: the console entry point (:mod:`qbitmap.entry`)
installs :func:`exit_interrupted` before anything heavy is imported, and the
CLI (:mod:`qbitmap.cli`) puts it back once a command has returned.
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
