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


def test_items_from_an_iterable_are_drawn_by_one_thread_at_a_time_and_kept_in_order():
    inside = threading.Lock()

    def source():
        for k in range(300):
            assert inside.acquire(blocking=False), "the iterable was read by two threads at once"
            time.sleep(0.0001)
            inside.release()
            yield k

    assert list(ordered_map(lambda k, _s: -k, source(), lambda: None, workers=2)) == [
        -k for k in range(300)
    ]


def test_workers_run_at_most_ahead_items_in_front_of_the_caller():
    drawn = []

    def source():
        for k in range(100):
            drawn.append(k)
            yield k

    results = ordered_map(lambda k, _s: k, source(), lambda: None, workers=2, ahead=3)
    assert next(results) == 0
    time.sleep(0.2)  # the caller holds still: the workers must wait for it
    assert len(drawn) <= 1 + 3
    assert list(results) == list(range(1, 100))


def test_a_failing_iterable_raises_in_order_after_the_items_before_it():
    def source():
        yield from range(5)
        raise OSError("the plan could not be read")

    got: list[int] = []
    with pytest.raises(OSError, match="plan"):
        got.extend(ordered_map(lambda k, _s: k, source(), lambda: None, workers=2))
    assert got == list(range(5))
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())


def test_a_failing_scratch_is_raised_not_waited_for():
    def scratch():
        raise MemoryError("no buffer")

    with pytest.raises(MemoryError, match="no buffer"):
        list(ordered_map(lambda k, _s: k, 10, scratch, workers=2))
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())


def test_a_slow_draw_does_not_hold_back_results_already_computed():
    release = threading.Event()

    def source():
        yield 0
        yield 1
        release.wait(timeout=10)  # one worker stays inside the source
        yield 2

    results = ordered_map(lambda k, _s: k, source(), lambda: None, workers=2)
    started = time.monotonic()
    assert [next(results), next(results)] == [0, 1]
    assert time.monotonic() - started < 5, "results waited for the source"
    release.set()
    assert list(results) == [2]


@pytest.mark.parametrize("leave", ["close", "interrupt"])
def test_a_caller_that_leaves_stops_the_draws_and_the_workers(leave):
    drawn = []

    def source():
        for k in range(10_000):
            drawn.append(k)
            yield k

    def fn(k, _s):
        time.sleep(0.001)
        return k

    results = ordered_map(fn, source(), lambda: None, workers=2, ahead=4)
    if leave == "close":
        assert next(results) == 0
        results.close()
    else:
        with pytest.raises(KeyboardInterrupt):
            for k in results:
                if k == 3:
                    raise KeyboardInterrupt
        del results
    count = len(drawn)
    assert count <= 4 + 4 + 1
    time.sleep(0.05)
    assert len(drawn) == count, "the source was read after the caller left"
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())
