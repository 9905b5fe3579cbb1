"""The one place qbitmap runs work on more than one thread.

Contract of :func:`ordered_map`: ``fn(item, scratch)`` is computed for every
item of *items* (``range(items)`` when it is a number); results come back in
the items' order; the iterable is read by one thread at a time, and at most
*ahead* items are taken and not yet handed back, so neither the items drawn
nor the results waiting grow with the work; each worker thread owns one
``scratch()`` object (reusable buffers); the first exception, in order --
from ``fn``, ``scratch`` or the iterable itself -- is raised in the calling
thread, and leaving the iteration early stops the workers.  Threads pay off
only for work that releases the GIL (``pread``, numpy comparisons,
``memcmp``): :data:`WORKERS` is the number of processors, at most two,
because that is where the storage bandwidth of one reader and one comparer
is used up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, overload

WORKERS = min(2, os.cpu_count() or 1)

_T = TypeVar("_T")
_S = TypeVar("_S")
_I = TypeVar("_I")


@overload
def ordered_map(
    fn: Callable[[int, _S], _T],
    items: int,
    scratch: Callable[[], _S],
    *,
    workers: int = ...,
    ahead: int | None = ...,
) -> Iterator[_T]: ...


@overload
def ordered_map(
    fn: Callable[[_I, _S], _T],
    items: Iterable[_I],
    scratch: Callable[[], _S],
    *,
    workers: int = ...,
    ahead: int | None = ...,
) -> Iterator[_T]: ...


def ordered_map(
    fn: Callable[[object, _S], _T],
    items: int | Iterable[object],
    scratch: Callable[[], _S],
    *,
    workers: int = WORKERS,
    ahead: int | None = None,
) -> Iterator[_T]:
    """``fn(item, scratch)`` for each item, in order, on *workers* threads.

    *ahead* (default four per worker) bounds the items taken but not yet
    handed back to the caller.
    """
    source: Iterator[object] = iter(range(items) if isinstance(items, int) else items)
    if workers <= 1 or (isinstance(items, int) and items <= 1):
        own = scratch()
        for item in source:
            yield fn(item, own)
        return
    limit = max(ahead or 4 * workers, workers)
    # ``cond`` guards what the caller and the workers share; ``draw`` makes
    # one worker at a time read the source, without holding ``cond``, so
    # that a slow ``next`` delays neither the results nor the caller.
    cond = threading.Condition()
    draw = threading.Lock()
    results: dict[int, tuple[bool, object]] = {}
    claimed = 0  # items the workers have made room for (drawn or being drawn)
    handed = 0  # results handed back to the caller
    total: int | None = None  # the number of items, once the source is done (or failed)
    stop = False
    drawn = 0  # under ``draw``: items drawn so far
    source_done = False  # under ``draw``

    def take() -> tuple[int, object] | None:
        """The next item and its number; None when the source is done or the caller left."""
        nonlocal drawn, source_done, total
        with draw:
            if source_done or stop:
                return None
            k = drawn
            try:
                item = next(source)
            except StopIteration:
                source_done = True
                with cond:
                    total = k
                    cond.notify_all()
                return None
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                source_done = True
                with cond:
                    results[k] = (False, exc)
                    total = k + 1
                    cond.notify_all()
                return None
            drawn = k + 1
            return k, item

    def work() -> None:
        nonlocal claimed
        own: _S | None = None
        while True:
            with cond:
                while not stop and total is None and claimed - handed >= limit:
                    cond.wait()
                if stop or total is not None:
                    return
                claimed += 1
            taken = take()
            if taken is None:
                return
            k, item = taken
            try:
                if own is None:
                    own = scratch()
                outcome: tuple[bool, object] = (True, fn(item, own))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                outcome = (False, exc)
            with cond:
                results[k] = outcome
                cond.notify_all()

    threads = [
        threading.Thread(target=work, name="qbitmap-worker", daemon=True) for _ in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        k = 0
        while True:
            with cond:
                while k not in results and (total is None or k < total):
                    cond.wait()
                if k not in results:
                    return
                ok, value = results.pop(k)
                handed = k + 1
                cond.notify_all()
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
            k += 1
    finally:
        with cond:
            stop = True
            cond.notify_all()
        for t in threads:
            t.join()
