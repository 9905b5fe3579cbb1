"""What may be opened as an image: a regular file or a block device, known before opening.

Shared by the commands and the Python API (``qbitmap.api``), so that both
refuse the same files with the same words.  Standard library only: cheap to
import at start-up.
"""

from __future__ import annotations

import os
import stat

from qbitmap.errors import ImageIOError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
)


def require_image_file(path: str | os.PathLike[str]) -> None:
    """Refuse *path* (ImageIOError, naming it) unless it is a regular file or a block device.

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
