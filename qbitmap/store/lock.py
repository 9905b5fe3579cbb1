"""Holding QEMU's lock bytes like a QEMU writer while qbitmap writes an image.

What the bytes mean, and how they are tested and taken, is in
:mod:`qbitmap.lockbytes`.  qbitmap writes metadata (and may grow the file), so
while it writes it holds what a QEMU writer holds -- bytes 100 (consistent
read), 101 (write), 102 (write unchanged) and 103 (resize) -- and refuses to
share write, write-unchanged and resize (201, 202, 203).  It shares consistent
read (200 stays free), as a QEMU writer does.  A QEMU started meanwhile that
wants to write (or to read without ``-U``, which refuses to share write) then
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

from types import TracebackType
from typing import Self

from qbitmap import lockbytes
from qbitmap.errors import ImageBusyError


def busy_message(path: object, held: set[int]) -> str:
    bytes_text = ", ".join(lockbytes.describe_byte(b) for b in sorted(held))
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
    are any), takes ``F_RDLCK`` OFD locks on ``lockbytes.WRITER_LOCK_BYTES``, then
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
        held = lockbytes.held_by_others(self.fd)
        if held:
            raise ImageBusyError(busy_message(self.path, held))
        taken: list[int] = []
        try:
            for byte in lockbytes.WRITER_LOCK_BYTES:
                try:
                    lockbytes.take(self.fd, byte)
                except OSError as exc:
                    # EAGAIN/EACCES: someone holds an exclusive lock on the byte.
                    raise ImageBusyError(busy_message(self.path, {byte})) from exc
                taken.append(byte)
            held = lockbytes.held_by_others(self.fd)
            if held:
                raise ImageBusyError(busy_message(self.path, held))
        except BaseException:
            self._unlock(taken)
            raise
        self.held = tuple(taken)
        return self

    def _unlock(self, bytes_: list[int] | tuple[int, ...]) -> None:
        for byte in bytes_:
            lockbytes.release(self.fd, byte)

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
