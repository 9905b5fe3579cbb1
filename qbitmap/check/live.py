"""Is a QEMU process holding the image right now?  (qcow2-digest section 6.)

QEMU's file driver takes one-byte shared OFD locks at 100+i ("I hold
permission i") and 200+i ("I do not share permission i").  We only *test*
them with ``F_OFD_GETLK``/``F_WRLCK``, which takes no lock and changes
nothing; a reply other than ``F_UNLCK`` means another open file description
holds that byte.  Bytes 104 and 204 are tested too for QEMU <= 6.1.
"""

from __future__ import annotations

import fcntl
import struct

LOCK_BYTES = (100, 101, 102, 103, 104, 200, 201, 202, 203, 204)

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = max(_FLOCK.size, 32)


def held_lock_bytes(fd: int, offsets: tuple[int, ...] = LOCK_BYTES) -> tuple[int, ...]:
    """The lock bytes among *offsets* that another open file description holds.

    Returns an empty tuple when the platform has no OFD locks or the test
    fails: the check is advisory and must never stop ``check``.
    """
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return ()
    held = []
    for off in offsets:
        request = _FLOCK.pack(fcntl.F_WRLCK, 0, off, 1, 0).ljust(_FLOCK_SIZE, b"\0")
        try:
            reply = fcntl.fcntl(fd, getlk, request)
        except OSError:
            return ()
        l_type = _FLOCK.unpack(reply[: _FLOCK.size])[0]
        if l_type != fcntl.F_UNLCK:
            held.append(off)
    return tuple(held)


def describe(held: tuple[int, ...]) -> str:
    """A short phrase for the held bytes: which permissions are taken or refused."""
    names = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize", 4: "graph mod"}
    holds = [names[b - 100] for b in held if 100 <= b <= 104]
    refuses = [names[b - 200] for b in held if 200 <= b <= 204]
    parts = []
    if holds:
        parts.append("holds " + ", ".join(holds))
    if refuses:
        parts.append("does not share " + ", ".join(refuses))
    return "; ".join(parts) or "no lock bytes"


def writer_present(held: tuple[int, ...]) -> bool:
    """Whether the held bytes say someone has the image open for writing."""
    return 101 in held or 103 in held
