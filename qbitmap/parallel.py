"""The one place qbitmap runs work on more than one thread.

Contract of :func:`ordered_map`: ``fn(k, scratch)`` is computed for every
``k`` in ``range(count)``; results come back in order of ``k``; each worker
thread owns one ``scratch()`` object (reusable buffers); the first exception,
in order, is raised in the calling thread, and leaving the iteration early
stops the workers.  Threads pay off only for work that releases the GIL
(``pread``, numpy comparisons, ``memcmp``): :data:`WORKERS` is the number of
processors, at most two, because that is where the storage bandwidth of one
reader and one comparer is used up.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

WORKERS = min(2, os.cpu_count() or 1)

_T = TypeVar("_T")
_S = TypeVar("_S")


def ordered_map(
    fn: Callable[[int, _S], _T],
    count: int,
    scratch: Callable[[], _S],
    *,
    workers: int = WORKERS,
) -> Iterator[_T]:
    """``fn(k, scratch)`` for ``k`` in ``range(count)``, in order, on *workers* threads."""
    if workers <= 1 or count <= 1:
        own = scratch()
        for k in range(count):
            yield fn(k, own)
        return
    results: list[tuple[bool, object]] = [(False, None)] * count
    ready = [threading.Event() for _ in range(count)]
    take = itertools.count().__next__  # atomic under the GIL
    stop = threading.Event()

    def work() -> None:
        own = scratch()
        while not stop.is_set():
            k = take()
            if k >= count:
                return
            try:
                results[k] = (True, fn(k, own))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                results[k] = (False, exc)
            ready[k].set()

    threads = [
        threading.Thread(target=work, name="qbitmap-worker", daemon=True)
        for _ in range(min(workers, count))
    ]
    for t in threads:
        t.start()
    try:
        for k in range(count):
            ready[k].wait()
            ok, value = results[k]
            results[k] = (False, None)
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        for t in threads:
            t.join()
