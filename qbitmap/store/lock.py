"""QEMU's image lock bytes: detect another user, and hold them like a QEMU writer.

QEMU's file driver (block/file-posix.c) expresses block-layer permissions as
one-byte shared (``F_RDLCK``) open-file-description locks: byte ``100 + i``
means "I hold permission *i*", byte ``200 + i`` means "I do not share
permission *i*", with *i* = 0 consistent-read, 1 write, 2 write-unchanged,
3 resize (4, graph-mod, only on QEMU <= 6.1).  A would-be user tests the
bytes that conflict with it by asking ``F_OFD_GETLK`` whether an exclusive
(``F_WRLCK``) lock could be taken; OFD ``GETLK`` ignores locks held through
the same open file description.  (shared/reference/qcow2-digest.md, section 6.)

qbitmap writes metadata (and may grow the file), so while it writes it holds
what a QEMU writer holds -- bytes 100 (consistent read), 101 (write), 102
(write unchanged) and 103 (resize) -- and refuses to share write,
write-unchanged and resize (201, 202, 203).  It shares consistent read
(200 stays free), as a QEMU writer does.  A QEMU started meanwhile that wants
to write (or to read without ``-U``, which refuses to share write) then
fails with ``Failed to get "write" lock`` / ``Failed to get shared "write"
lock``.  ``qemu-img info -U`` still works: it takes no lock.

Before taking anything, and again after, every byte 100..104 and 200..204
is tested: any foreign holder -- a QEMU reader, a QEMU writer, another
qbitmap -- makes the image busy.  That is stricter than QEMU's own rule
(which would let us write while a reader holds only byte 100), on purpose:
a reader without ``-U`` that sees metadata change under it is exactly what
the lock protocol is there to prevent.

Caveats (also in man/qbitmap-recover.1): the locks are advisory; a QEMU
started with ``locking=off`` and non-QEMU tools do not see them.
"""

from __future__ import annotations

import fcntl
import os
import struct
from types import TracebackType
from typing import Self

from qbitmap.errors import ImageBusyError, ImageIOError

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# Permission bits (BLK_PERM_*): 0 consistent read, 1 write, 2 write unchanged,
# 3 resize, 4 graph-mod (removed in QEMU 6.2, still locked by older QEMU).
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph mod")

#: Every byte a QEMU of any version may lock.
QEMU_LOCK_BYTES: tuple[int, ...] = tuple(range(100, 105)) + tuple(range(200, 205))
#: The bytes qbitmap holds while it writes: holds 0-3, does not share 1-3.
WRITER_LOCK_BYTES: tuple[int, ...] = (100, 101, 102, 103, 201, 202, 203)

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding to 32 bytes on 64-bit).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(lock_type: int, start: int) -> bytes:
    # OFD locks require l_pid == 0.
    return _FLOCK.pack(lock_type, os.SEEK_SET, start, 1, 0)


def describe_byte(byte: int) -> str:
    """``'101 (holds "write")'`` for a QEMU lock byte."""
    if RAW_LOCK_SHARED_BASE <= byte < RAW_LOCK_SHARED_BASE + len(PERM_NAMES):
        return f'{byte} (does not share "{PERM_NAMES[byte - RAW_LOCK_SHARED_BASE]}")'
    if RAW_LOCK_PERM_BASE <= byte < RAW_LOCK_PERM_BASE + len(PERM_NAMES):
        return f'{byte} (holds "{PERM_NAMES[byte - RAW_LOCK_PERM_BASE]}")'
    return str(byte)


def foreign_lock_bytes(fd: int, bytes_: tuple[int, ...] = QEMU_LOCK_BYTES) -> set[int]:
    """The QEMU lock bytes of the file behind *fd* that some other open file holds.

    Each byte is probed with ``F_OFD_GETLK`` for an exclusive lock, as QEMU's
    ``qemu_lock_fd_test`` does.  Locks held through *fd*'s own open file
    description are not reported.  Nothing is locked or changed.

    Args:
        fd: any open file descriptor of the image (read-only is enough).
        bytes_: the byte offsets to probe (default: 100..104 and 200..204).

    Returns:
        The set of byte offsets another open file description holds.
    """
    held: set[int] = set()
    for byte in bytes_:
        try:
            result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        except OSError as exc:
            raise ImageIOError(f"cannot test lock byte {byte}: {exc.strerror}") from exc
        lock_type = _FLOCK.unpack(result)[0]
        if lock_type != fcntl.F_UNLCK:
            held.add(byte)
    return held


def busy_message(path: object, held: set[int]) -> str:
    bytes_text = ", ".join(describe_byte(b) for b in sorted(held))
    return (
        f"{path}: the image is locked by another process (lock bytes {bytes_text}); "
        "is QEMU or another qbitmap using the image?"
    )


class ImageLock:
    """QEMU-compatible write lock on an image, held until :meth:`release`.

    Usage::

        with ImageLock(fd, path):
            ...  # nobody using QEMU's block layer can open the image meanwhile

    :meth:`acquire` tests for foreign holders (and changes nothing if there
    are any), takes ``F_RDLCK`` OFD locks on :data:`WRITER_LOCK_BYTES`, then
    tests again to close the race with a process that locked in between; if
    that second test finds a holder, our locks are dropped and
    :class:`ImageBusyError` (exit 75) is raised.

    The locks belong to *fd*'s open file description: they last until
    released or until every descriptor of that description is closed, and
    closing an unrelated descriptor of the same file does not drop them.
    """

    def __init__(self, fd: int, path: object = "image") -> None:
        self.fd = fd
        self.path = path
        self.held: tuple[int, ...] = ()

    def acquire(self) -> Self:
        held = foreign_lock_bytes(self.fd)
        if held:
            raise ImageBusyError(busy_message(self.path, held))
        taken: list[int] = []
        try:
            for byte in WRITER_LOCK_BYTES:
                try:
                    fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
                except OSError as exc:
                    # EAGAIN/EACCES: someone holds an exclusive lock on the byte.
                    raise ImageBusyError(busy_message(self.path, {byte})) from exc
                taken.append(byte)
            held = foreign_lock_bytes(self.fd)
            if held:
                raise ImageBusyError(busy_message(self.path, held))
        except BaseException:
            self._unlock(taken)
            raise
        self.held = tuple(taken)
        return self

    def _unlock(self, bytes_: list[int] | tuple[int, ...]) -> None:
        for byte in bytes_:
            try:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))
            except OSError:
                pass  # the fd may already be gone; closing it drops the lock anyway

    def release(self) -> None:
        """Drop our lock bytes (idempotent)."""
        self._unlock(self.held)
        self.held = ()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
