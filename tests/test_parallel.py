"""qbitmap.parallel.ordered_map: results in order, first failure raised, workers stopped."""

from __future__ import annotations

import threading
import time

import pytest

from qbitmap.parallel import ordered_map


def test_yields_in_order_from_several_threads():
    seen_threads = set()
    gate = threading.Barrier(2, timeout=10)

    def fn(k, scratch):
        seen_threads.add(threading.get_ident())
        if k < 2:
            gate.wait()  # the first two items run at the same time, in two threads
        scratch.append(k)
        return k * k

    assert list(ordered_map(fn, 50, list, workers=2)) == [k * k for k in range(50)]
    assert len(seen_threads) == 2


def test_raises_the_first_failure_in_order_and_stops():
    done = []

    def fn(k, _scratch):
        if k in (3, 7):
            raise ValueError(k)
        if k > 7:
            time.sleep(0.001)
        done.append(k)
        return k

    got: list[int] = []
    with pytest.raises(ValueError, match="3"):
        got.extend(ordered_map(fn, 1000, lambda: None, workers=2))
    assert got == [0, 1, 2]
    assert len(done) < 1000  # the workers stopped early
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())


def test_one_worker_runs_in_the_calling_thread():
    idents = set()

    def fn(k, _scratch):
        idents.add(threading.get_ident())
        return k

    assert list(ordered_map(fn, 5, lambda: None, workers=1)) == list(range(5))
    assert idents == {threading.get_ident()}
