"""QEMU's image lock bytes: what they mean, who holds them, and taking them.

QEMU's file driver (block/file-posix.c) expresses block-layer permissions as
one-byte shared (``F_RDLCK``) open-file-description locks: byte ``100 + i``
means "I hold permission *i*", byte ``200 + i`` means "I do not share
permission *i*", with *i* = 0 consistent read, 1 write, 2 write unchanged,
3 resize (4, graph mod, only on QEMU <= 6.1).  Whether another process holds
a byte is asked with ``F_OFD_GETLK`` for an exclusive (``F_WRLCK``) lock, as
QEMU's ``qemu_lock_fd_test`` does; that takes no lock, changes nothing, and
does not see locks held through the same open file description.

``check`` and ``dump`` only probe (:func:`probe`); ``qbitmap.store``'s
``ImageLock`` takes :data:`WRITER_LOCK_BYTES` for as long as it writes.
"""

from __future__ import annotations

import fcntl
import os
import struct

from qbitmap.errors import ImageIOError

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# Permission bits (BLK_PERM_*): 0 consistent read, 1 write, 2 write unchanged,
# 3 resize, 4 graph mod (removed in QEMU 6.2, still locked by older QEMU).
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph mod")

#: Every byte a QEMU of any version may lock.
QEMU_LOCK_BYTES: tuple[int, ...] = tuple(range(100, 105)) + tuple(range(200, 205))
#: The bytes qbitmap holds while it writes: holds 0-3, does not share 1-3 (a QEMU
#: writer's set, and write unchanged on both sides).
WRITER_LOCK_BYTES: tuple[int, ...] = (100, 101, 102, 103, 201, 202, 203)

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding to 32 bytes on 64-bit).
_FLOCK = struct.Struct("hhqqi4x")


def _flock(lock_type: int, start: int) -> bytes:
    # OFD locks require l_pid == 0.
    return _FLOCK.pack(lock_type, os.SEEK_SET, start, 1, 0)


def held_by_others(fd: int, bytes_: tuple[int, ...] = QEMU_LOCK_BYTES) -> set[int]:
    """The lock bytes among *bytes_* that another open file description holds.

    Raises ImageIOError when the test itself fails.
    """
    held: set[int] = set()
    for byte in bytes_:
        try:
            result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
        except OSError as exc:
            raise ImageIOError(f"cannot test lock byte {byte}: {exc.strerror}") from exc
        if _FLOCK.unpack(result)[0] != fcntl.F_UNLCK:
            held.add(byte)
    return held


def probe(fd: int) -> tuple[int, ...]:
    """The held lock bytes, sorted, for a reader's report: empty when they cannot be tested.

    Advisory: a platform without OFD locks, or a failing test, must never stop
    ``check`` or ``dump``.
    """
    if getattr(fcntl, "F_OFD_GETLK", None) is None:
        return ()
    try:
        return tuple(sorted(held_by_others(fd)))
    except ImageIOError:
        return ()


def writer_present(held: tuple[int, ...] | set[int]) -> bool:
    """Whether the held bytes say someone has the image open for writing (or resizing)."""
    return RAW_LOCK_PERM_BASE + 1 in held or RAW_LOCK_PERM_BASE + 3 in held


def describe(held: tuple[int, ...] | set[int]) -> str:
    """A short phrase for the held bytes: which permissions are taken or refused."""
    holds = [PERM_NAMES[b - RAW_LOCK_PERM_BASE] for b in sorted(held) if 100 <= b <= 104]
    refuses = [PERM_NAMES[b - RAW_LOCK_SHARED_BASE] for b in sorted(held) if 200 <= b <= 204]
    parts = []
    if holds:
        parts.append("holds " + ", ".join(holds))
    if refuses:
        parts.append("does not share " + ", ".join(refuses))
    return "; ".join(parts) or "no lock bytes"


def describe_byte(byte: int) -> str:
    """``'101 (holds "write")'`` for a QEMU lock byte."""
    if RAW_LOCK_SHARED_BASE <= byte < RAW_LOCK_SHARED_BASE + len(PERM_NAMES):
        return f'{byte} (does not share "{PERM_NAMES[byte - RAW_LOCK_SHARED_BASE]}")'
    if RAW_LOCK_PERM_BASE <= byte < RAW_LOCK_PERM_BASE + len(PERM_NAMES):
        return f'{byte} (holds "{PERM_NAMES[byte - RAW_LOCK_PERM_BASE]}")'
    return str(byte)


def take(fd: int, byte: int) -> None:
    """Take a shared OFD lock on *byte*; OSError (EAGAIN/EACCES) if someone holds it exclusively."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))


def release(fd: int, byte: int) -> None:
    """Drop our lock on *byte*; a descriptor already closed has dropped it anyway."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))
    except OSError:
        pass
