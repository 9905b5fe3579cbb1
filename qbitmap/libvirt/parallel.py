"""Examine many disks at once: one forked worker per CPU, each checking its share.

Checking an image is CPU work in Python (a few milliseconds per small
image, most of it in ``check``'s reference map), so a host with 40 disks
of 3 layers each waits on one core while the others idle.  With more than
one CPU available and enough disks, :func:`examine_disks` forks workers
(``os.fork``: nothing is re-imported), gives each every Nth disk, and
reads back their :class:`DiskState` objects pickled over a pipe, without
the reference maps nothing here uses.  The parent examines its own share
meanwhile.  A worker that fails is not trusted: its disks are examined
again in the parent.  Workers only read, exit with ``os._exit`` (no
buffers flushed twice) and are always waited for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
from collections.abc import Sequence

from qbitmap.libvirt.definitions import DiskDefinition
from qbitmap.libvirt.disks import DiskState, ImageCache, examine_disk

#: Fewer checkable disks than this are examined in the calling process.
MIN_PARALLEL_DISKS = 4
#: At most this many workers (the parent included).
MAX_JOBS = 8


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _portable(state: DiskState) -> DiskState:
    """*state* without what a worker need not send back (the check's reference maps)."""
    views = []
    for view in state.views:
        report = view.report
        if report is not None and report.reference_map is not None:
            report = dataclasses.replace(report, reference_map=None)
        views.append(dataclasses.replace(view, report=report))
    return dataclasses.replace(state, views=views)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _worker(write_fd: int, disks: Sequence[DiskDefinition], indices: Sequence[int]) -> None:
    code = 1
    try:
        cache = ImageCache()
        payload = pickle.dumps(
            [(i, _portable(examine_disk(disks[i], cache))) for i in indices],
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        view = memoryview(payload)
        while view:
            view = view[os.write(write_fd, view) :]
        code = 0
    finally:
        os._exit(code)


def examine_disks(
    disks: Sequence[DiskDefinition], cache: ImageCache, *, jobs: int | None = None
) -> list[DiskState]:
    """:func:`examine_disk` for every disk, in order; in parallel when it pays."""
    checkable = [i for i, d in enumerate(disks) if d.not_checkable_reason() is None]
    checkable_set = set(checkable)
    jobs = min(jobs or available_cpus(), MAX_JOBS, len(checkable))
    results: dict[int, DiskState] = {}
    children: list[tuple[int, int, list[int]]] = []
    if jobs > 1 and len(checkable) >= MIN_PARALLEL_DISKS:
        shares = [checkable[k::jobs] for k in range(jobs)]
        for share in shares[1:]:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _worker(write_fd, disks, share)
            os.close(write_fd)
            children.append((pid, read_fd, share))
        mine = shares[0]
    else:
        mine = checkable
    try:
        for i in mine:
            results[i] = examine_disk(disks[i], cache)
    except BaseException:
        for pid, read_fd, _share in children:
            os.close(read_fd)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    for pid, read_fd, share in children:
        try:
            data = _read_all(read_fd)
        finally:
            os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        answer = None
        if os.waitstatus_to_exitcode(status) == 0:
            with contextlib.suppress(pickle.UnpicklingError, EOFError, ValueError, TypeError):
                answer = pickle.loads(data)
        if answer is None:
            # The worker failed or its answer is damaged: do its share here.
            answer = [(i, examine_disk(disks[i], cache)) for i in share]
        results.update(answer)
    for i, disk in enumerate(disks):
        if i not in checkable_set:
            results[i] = examine_disk(disk, cache)  # says why it is not checkable; reads nothing
    return [results[i] for i in range(len(disks))]


__all__ = ["MAX_JOBS", "MIN_PARALLEL_DISKS", "available_cpus", "examine_disks"]
