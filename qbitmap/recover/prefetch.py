"""The first bytes of both files of a reference recovery, asked of the kernel at start-up.

A ``recover --reference`` process spends its first few hundred milliseconds
importing numpy and the format layer, opening and checking the image;
with both files cold on disk, the disks would idle all that time, and
then the comparison reads the files in full.  :func:`prefetch_heads` is
called before any of that: it asks the kernel to start reading the first
:data:`HEAD_BYTES` of each file into the page cache and returns at once,
so the start-up and the disks' first reads overlap.  The head of a qcow2
file is where QEMU puts the metadata the check reads first, and a disk's
data written in order follows it.

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
HEAD_BYTES = 128 << 20


def prefetch_heads(paths: Iterable[os.PathLike[str] | str]) -> None:
    """Ask the kernel to start reading the first :data:`HEAD_BYTES` of each regular file."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size:
                os.posix_fadvise(fd, 0, min(HEAD_BYTES, st.st_size), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


__all__ = ["HEAD_BYTES", "prefetch_heads"]
