"""Errors reported to the user as one line, and the exit codes they map to.

Library code raises these; only the CLI turns them into a message on stderr
and an exit status.  A corrupt image is *not* an exception for ``check``:
exceptions are for "cannot even read the structure" and for operational
failures (I/O, lock held, refusal).
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ExitCode(enum.IntEnum):
    """Exit statuses shared by every command (see man/qbitmap.1)."""

    OK = 0  # success / all bitmaps consistent / recovered or nothing to do
    FAILED = 1  # could not read or check the image, or recover failed
    CORRUPT = 2  # check: corruption; recover: refused because of corruption
    LEAKS = 3  # check: leaked clusters only
    IN_USE = 4  # check: in-use bitmaps with sound metadata
    USAGE = 64  # sysexits EX_USAGE; click's default 2 would read as CORRUPT
    BUSY = 75  # sysexits EX_TEMPFAIL: another process holds the image
    INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for an interrupted command


class QbitmapError(Exception):
    """Base for every error reported to the user without a traceback."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


class ImageFormatError(QbitmapError):
    """The bytes at *offset* do not form the structure we expected."""

    def __init__(self, message: str, *, offset: int | None, field: str | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.field = field

    @property
    def reason(self) -> str:
        return str(self.args[0])

    def __str__(self) -> str:
        if self.offset is None:
            return self.reason if self.field is None else f"{self.field}: {self.reason}"
        where = f"offset {self.offset:#x}"
        if self.field is not None:
            where += f" ({self.field})"
        return f"{where}: {self.reason}"


class UnsupportedImageError(QbitmapError):
    """A qcow2 image that qbitmap deliberately does not handle for this operation."""


class ImageIOError(QbitmapError):
    """The operating system refused a read, write or flush."""


class ImageBusyError(QbitmapError):
    """Another process (normally QEMU) holds the image's lock bytes."""

    exit_code = ExitCode.BUSY


class RefusedError(QbitmapError):
    """recover refuses to touch an image whose metadata is corrupt."""

    exit_code = ExitCode.CORRUPT


class UsageError(QbitmapError):
    """The request makes no sense for this image (for example an unknown bitmap name)."""

    exit_code = ExitCode.USAGE


class NoModeError(QbitmapError):
    """recover: no recovery mode applies to a bitmap (exit 1); the user must choose one."""


class AllocationError(QbitmapError):
    """store: a refcount could not be changed as asked (overflow, underflow, limits)."""


class TrackerClosedError(QbitmapError):
    """track: the Tracker was closed, or failed and can no longer promise anything."""
