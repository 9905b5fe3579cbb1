"""The byte-level seam every image write goes through.

``Disk`` is a four-method protocol (``pread``, ``pwrite``, ``flush``,
``size``).  :class:`FileDisk` implements it on a file descriptor with
``os.pread``/``os.pwrite`` (looping on short transfers) and ``os.fsync``.
:class:`CrashingDisk` wraps another Disk and dies with
:class:`SimulatedCrash` at a chosen write or flush, so tests can check the
on-disk state a crash at that instant leaves behind.  It can also model the
page cache being lost (power failure): writes not yet flushed are dropped,
or a random subset of them is kept, at the crash.
"""

from __future__ import annotations

import os
import random
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


class SimulatedCrash(BaseException):
    """Raised by :class:`CrashingDisk` in place of the write or flush that "crashed".

    A BaseException, so ``except Exception`` clean-up paths do not run, as
    they would not after a real kill.
    """


class CrashingDisk:
    """A Disk wrapper that crashes at operation number *crash_at*.

    Operations are the writes and flushes in issue order, counted from 0;
    reads are free.  Operation *crash_at* is not performed: it raises
    :class:`SimulatedCrash`, and so does every operation after it.
    ``crash_at=None`` never crashes (use it to count operations: ``ops``).

    Args:
        inner: the Disk that receives the writes that "reached the disk".
        crash_at: the operation number that crashes, or None.
        lose_unflushed: model a power failure instead of a process kill.  Writes
            are then held back until the next flush; at the crash, those still
            pending are dropped -- or, with *rng*, each is kept with
            probability 1/2 (the page cache writes back in any order).
        rng: random source for the subset of pending writes that survive.
    """

    def __init__(
        self,
        inner: Disk,
        crash_at: int | None,
        *,
        lose_unflushed: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.lose_unflushed = lose_unflushed
        self.rng = rng
        self.ops = 0
        self.crashed = False
        self.pending: list[tuple[int, bytes]] = []
        self.log: list[tuple[str, int, int]] = []  # ("write"|"flush", offset, length)

    def _tick(self, kind: str, offset: int = 0, length: int = 0) -> None:
        if self.crashed:
            raise SimulatedCrash(f"{kind} after the crash")
        if self.crash_at is not None and self.ops >= self.crash_at:
            self.crashed = True
            if self.lose_unflushed and self.rng is not None:
                for offset_, data in self.pending:
                    if self.rng.random() < 0.5:
                        self.inner.pwrite(offset_, data)
            self.pending.clear()
            raise SimulatedCrash(f"crash at operation {self.ops} ({kind})")
        self.ops += 1
        self.log.append((kind, offset, length))

    def pread(self, offset: int, length: int) -> bytes:
        if not self.pending:
            return self.inner.pread(offset, length)
        buf = bytearray(self.inner.pread(offset, length))
        end = offset + length
        for w_offset, data in self.pending:
            w_end = w_offset + len(data)
            if w_end <= offset or w_offset >= end:
                continue
            if w_end > offset + len(buf):
                buf.extend(bytes(min(w_end, end) - offset - len(buf)))
            lo = max(offset, w_offset)
            hi = min(end, w_end)
            buf[lo - offset : hi - offset] = data[lo - w_offset : hi - w_offset]
        return bytes(buf)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._tick("write", offset, len(data))
        if self.lose_unflushed:
            self.pending.append((offset, bytes(data)))
        else:
            self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._tick("flush")
        for offset, data in self.pending:
            self.inner.pwrite(offset, data)
        self.pending.clear()
        self.inner.flush()

    def size(self) -> int:
        size = self.inner.size()
        for offset, data in self.pending:
            size = max(size, offset + len(data))
        return size
