"""Asking the kernel to read ahead: the start-up read of both files, and the unit of a request.

A ``recover --reference`` process spends its first few hundred milliseconds
importing numpy and the format layer, opening and checking the image;
with both files cold on disk, the disks would idle all that time, and
then the comparison reads the files in full.  :func:`prefetch_heads` is
called before any of that: it asks the kernel to start reading the first
:data:`HEAD_BYTES` of each file into the page cache and returns at once,
so the start-up and the disks' first reads overlap.  The head of a qcow2
file is where QEMU puts the metadata the check reads first, and a disk's
data written in order follows it.

Linux reads at most the larger of the device's read-ahead window and its
largest request for one ``POSIX_FADV_WILLNEED`` call (``force_page_cache_ra``
in mm/readahead.c caps it; the rest of the range is dropped), so a range is
asked for in pieces of :func:`request_unit` bytes -- here, and by the
comparison's :class:`qbitmap.recover.reference.ReadAhead`.

A speed trick, in this one place, with this contract:

* It reads nothing into the process: ``posix_fadvise(POSIX_FADV_WILLNEED)``
  starts the kernel's reads and returns; the page cache it fills is bounded
  (:data:`HEAD_BYTES` per file), whatever the size of the files.
* It is advice: every byte used is read again with ``pread`` by the code
  that uses it (from the cache if the hint worked), so no result depends on
  it, and it never fails: a path it cannot open or that is not a regular
  file is passed over, and the real open reports the error.
* It opens without blocking (``O_NONBLOCK``: a FIFO does not wait for a
  writer) and only reads: it takes no lock and writes nothing.

Standard library only: it runs before the heavy imports it overlaps.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

#: Bytes of each file asked for at start-up: about what the disks read while the
#: process starts (bench/bench_recover.py), and little page cache.
HEAD_BYTES = 256 << 20
#: A request, when the device does not say how much one may be.
DEFAULT_UNIT = 1 << 20
_UNIT_RANGE = (128 << 10, 16 << 20)


def request_unit(fd: int) -> int:
    """The most one ``POSIX_FADV_WILLNEED`` call reads from *fd*'s device, in bytes.

    The larger of the block device's ``read_ahead_kb`` and ``max_sectors_kb``
    (a partition's come from its disk); :data:`DEFAULT_UNIT` where there is
    no block device to ask (tmpfs, network file systems).
    """
    try:
        dev = os.fstat(fd).st_dev
    except OSError:
        return DEFAULT_UNIT
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    found = []
    for queue in ("queue", "../queue"):
        for name in ("read_ahead_kb", "max_sectors_kb"):
            try:
                with open(os.path.join(base, queue, name)) as f:
                    found.append(int(f.read()) << 10)
            except (OSError, ValueError):
                pass
    if not found:
        return DEFAULT_UNIT
    low, high = _UNIT_RANGE
    return max(low, min(high, max(found)))


def advise_willneed(fd: int, start: int, end: int, unit: int) -> None:
    """Ask the kernel to read ``[start, end)`` of *fd*, *unit* bytes per request.

    Raises OSError as ``posix_fadvise`` does (a file that takes no advice).
    """
    for pos in range(start, end, unit):
        os.posix_fadvise(fd, pos, min(unit, end - pos), os.POSIX_FADV_WILLNEED)


def ask_for_head(fd: int, unit: int) -> int:
    """Ask the kernel for the head of *fd*'s file, *unit* bytes per request; its length.

    The head is the first :data:`HEAD_BYTES` of a regular file (0 bytes of
    anything else).  Raises OSError as ``fstat`` and ``posix_fadvise`` do.
    """
    st = os.fstat(fd)
    head = min(HEAD_BYTES, st.st_size) if stat.S_ISREG(st.st_mode) else 0
    advise_willneed(fd, 0, head, unit)
    return head


def prefetch_heads(paths: Iterable[os.PathLike[str] | str]) -> None:
    """Ask the kernel to start reading the head of each regular file (:func:`ask_for_head`)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            ask_for_head(fd, request_unit(fd))
        except OSError:
            pass
        finally:
            os.close(fd)


__all__ = [
    "DEFAULT_UNIT",
    "HEAD_BYTES",
    "advise_willneed",
    "ask_for_head",
    "prefetch_heads",
    "request_unit",
]
