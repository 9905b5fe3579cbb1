"""qbitmap: inspect, check and repair persistent dirty bitmaps in qcow2 images.

The Python API is the names in ``__all__`` (reference and examples:
``docs/api.md``); every other module of the package is private::

    import qbitmap

    with qbitmap.open_image("disk.qcow2") as image:
        for start, length in image.extents("daily"):
            data = image.read(start, length)

    report = qbitmap.check("disk.qcow2")   # what `qbitmap check --json` prints
    if report.exit_code == qbitmap.ExitCode.IN_USE:
        qbitmap.recover("disk.qcow2", mode="full")

``import qbitmap`` loads nothing else: each name is loaded on first use
(module ``__getattr__``), the exceptions from ``qbitmap.errors``, the rest
from ``qbitmap.api``.
"""

from __future__ import annotations

import sys as _sys
import types as _types

# Not typing's: the console entry point imports this package before its SIGINT handler is
# in place, and typing would lengthen that window.  Type checkers know the name.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "Bitmap",
    "BitmapCheck",
    "BitmapRecovery",
    "CheckReport",
    "Checkpoint",
    "CheckpointDisk",
    "CheckpointsReport",
    "ExitCode",
    "Finding",
    "Image",
    "ImageBusyError",
    "ImageFormatError",
    "ImageIOError",
    "NoModeError",
    "QbitmapError",
    "RecoverReport",
    "RefusedError",
    "StaleBitmapError",
    "UnsupportedImageError",
    "UsageError",
    "check",
    "checkpoints",
    "open_image",
    "recover",
]

if TYPE_CHECKING:
    from typing import Any

    from qbitmap.api import (
        Bitmap,
        BitmapCheck,
        BitmapRecovery,
        Checkpoint,
        CheckpointDisk,
        CheckpointsReport,
        CheckReport,
        Finding,
        Image,
        RecoverReport,
        check,
        checkpoints,
        open_image,
        recover,
    )
    from qbitmap.errors import (
        ExitCode,
        ImageBusyError,
        ImageFormatError,
        ImageIOError,
        NoModeError,
        QbitmapError,
        RefusedError,
        StaleBitmapError,
        UnsupportedImageError,
        UsageError,
    )

# The exceptions and exit codes cost one small module: an ``except qbitmap.UsageError``
# loads neither numpy nor construct.
_FROM_ERRORS = frozenset(
    {
        "ExitCode",
        "ImageBusyError",
        "ImageFormatError",
        "ImageIOError",
        "NoModeError",
        "QbitmapError",
        "RefusedError",
        "StaleBitmapError",
        "UnsupportedImageError",
        "UsageError",
    }
)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _FROM_ERRORS:
        from qbitmap import errors

        value = getattr(errors, name)
    else:
        from qbitmap import api

        value = getattr(api, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(_types.ModuleType):
    """The module type of ``qbitmap``: ``check`` and ``recover`` stay the API functions.

    ``qbitmap/check/`` and ``qbitmap/recover/`` are subpackages too, and
    importing a submodule sets an attribute of its name on its package,
    which would hide the function of the same name.  They stay reachable as
    modules through ``from qbitmap.check import ...`` and ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
