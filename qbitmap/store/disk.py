"""The byte-level seam every image write goes through.

``Disk`` is a four-method protocol (``pread``, ``pwrite``, ``flush``,
``size``).  :class:`FileDisk` implements it on a file descriptor with
``os.pread``/``os.pwrite`` (looping on short transfers) and ``os.fsync``.
Tests wrap it to crash at a chosen write or flush (tests/crashdisk.py) and
to record or delay writes: every byte qbitmap writes goes through this seam.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from qbitmap.errors import ImageIOError
from qbitmap.format.image import pread_full


@runtime_checkable
class Disk(Protocol):
    """Random-access storage of one image file."""

    def pread(self, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset*; short only at the end of the file."""
        ...

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write all of *data* at *offset* (the file grows if needed)."""
        ...

    def flush(self) -> None:
        """Make every write issued so far durable."""
        ...

    def size(self) -> int:
        """Current length of the file in bytes (unflushed writes included)."""
        ...


@dataclass
class DiskStats:
    """Counters a Disk keeps, for tests and --json reports."""

    writes: int = 0
    bytes_written: int = 0
    flushes: int = 0
    write_log: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)


class FileDisk:
    """A Disk on an open file descriptor (which the caller keeps and closes)."""

    def __init__(self, fd: int, path: object = "image") -> None:
        self.fd = fd
        self.path = path
        self.stats = DiskStats()

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return pread_full(self.fd, offset, length)
        except OSError as exc:
            raise ImageIOError(
                f"{self.path}: read of {length} bytes at {offset:#x} failed: {exc.strerror}"
            ) from exc

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self.stats.write_log.append((offset, len(data)))
        while view:
            try:
                done = os.pwrite(self.fd, view, offset)
            except OSError as exc:
                raise ImageIOError(
                    f"{self.path}: write of {len(view)} bytes at {offset:#x} failed: {exc.strerror}"
                ) from exc
            if done <= 0:
                raise ImageIOError(f"{self.path}: write at {offset:#x} made no progress")
            view = view[done:]
            offset += done

    def flush(self) -> None:
        self.stats.flushes += 1
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise ImageIOError(f"{self.path}: fsync failed: {exc.strerror}") from exc

    def size(self) -> int:
        return os.fstat(self.fd).st_size
