"""Crash simulation of the Tracker's protocol against a pure in-memory model.

The Tracker code under test is the real one (qbitmap.track.tracker); only
its Backend is the model of tests/track/levels_model.py, which can stop at
any numbered write or flush and lose (or partly keep) what was not flushed.
The property: whatever the crash point, recovery from what survived covers
every write whose ``Tracker.write`` returned.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from levels_helpers import FakeClock
from levels_model import Crash, ModelBackend, bits_from_ranges, missing_bits

from qbitmap import levels
from qbitmap.track import FlushPolicy
from qbitmap.track.state import LevelState
from qbitmap.track.tracker import Tracker


def run_trial(
    nbits: int,
    level_bits: int,
    cluster_size: int,
    base_ranges: list[tuple[int, int]],
    script: list[tuple],
    crash_at: int | None,
    *,
    persist_seed: int | None = None,
    policy: FlushPolicy | None = None,
    state_cls: type[LevelState] = LevelState,
) -> tuple[ModelBackend, np.ndarray, bool]:
    """Run *script* on a Tracker over the model; returns (model, accepted bits, crashed)."""
    base = bits_from_ranges(nbits, base_ranges)
    rng = random.Random(persist_seed) if persist_seed is not None else None
    model = ModelBackend(base, nbits, level_bits, cluster_size, crash_at=crash_at, persist_some=rng)
    accepted = base.copy()
    clock = FakeClock()
    crashed = False
    try:
        state = state_cls(base, nbits, level_bits, cluster_size)
        tracker = Tracker(
            model, state, granularity=1, virtual_size=nbits, policy=policy, clock=clock
        )
        for step in script:
            if step[0] == "write":
                _, first, end = step
                tracker.write(first, end - first)
                accepted |= bits_from_ranges(nbits, [(first, end)])
            elif step[0] == "flush":
                tracker.flush()
            elif step[0] == "sleep":
                clock.now += step[1]
                tracker.tick()
        tracker.close()
    except Crash:
        crashed = True
    return model, accepted, crashed


@st.composite
def scenarios(draw):
    level_bits = draw(st.integers(1, 4), label="level_bits")
    nbits = draw(st.integers(1, 3000), label="nbits")
    cluster_size = draw(st.sampled_from([8, 32, 128]), label="cluster_size")

    def a_range():
        first = draw(st.integers(0, nbits - 1))
        return first, draw(st.integers(first + 1, min(nbits, first + 40)))

    base = [a_range() for _ in range(draw(st.integers(0, 5), label="nb_base"))]
    script: list[tuple] = []
    for _ in range(draw(st.integers(0, 40), label="nb_steps")):
        kind = draw(st.sampled_from(["write"] * 6 + ["flush", "sleep"]))
        if kind == "write":
            script.append(("write", *a_range()))
        elif kind == "flush":
            script.append(("flush",))
        else:
            script.append(("sleep", draw(st.sampled_from([0.01, 0.2, 2.0]))))
    policy = draw(
        st.sampled_from(
            [
                None,
                FlushPolicy(changed_kib=0.01),
                FlushPolicy(every_seconds=1.0),
                FlushPolicy(idle_ms=100),
                FlushPolicy(every_seconds=1.0, changed_kib=0.05, idle_ms=100),
            ]
        ),
        label="policy",
    )
    crash_at = draw(st.integers(0, 150), label="crash_at")
    persist = draw(st.one_of(st.none(), st.integers(0, 2**32)), label="persist_seed")
    return nbits, level_bits, cluster_size, base, script, crash_at, persist, policy


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_level_recovery_covers_every_accepted_write(scenario) -> None:
    nbits, level_bits, cluster_size, base, script, crash_at, persist, policy = scenario
    model, accepted, crashed = run_trial(
        nbits, level_bits, cluster_size, base, script, crash_at, persist_seed=persist, policy=policy
    )
    recovered, how = model.recover()
    assert missing_bits(accepted, recovered) == 0, (how, model.log)
    if not crashed:
        # A clean close leaves a consistent bitmap that is exactly T.
        d = model.durable
        assert not d.in_use and d.record_level is None and not d.bit63
        assert how == "consistent"
        assert (recovered == accepted).all()


def test_every_crash_point_of_one_script() -> None:
    """Exhaustive over crash points: including between a record update and a bitmap flush."""
    nbits, level_bits = 300, 2
    base = [(0, 1)]
    script = [
        ("write", 1, 2),  # X = max_level = c
        ("write", 100, 104),
        ("flush",),
        ("write", 5, 6),
        ("write", 250, 251),  # a new level-0 group
        ("write", 6, 7),
        ("flush",),
        ("write", 299, 300),
    ]
    _, _, crashed = run_trial(nbits, level_bits, 16, base, script, None)
    assert not crashed
    # Count the operations of a crash-free run to bound the crash points.
    model, _, _ = run_trial(nbits, level_bits, 16, base, script, 10**6)
    total_ops = model.ops
    assert total_ops > 20
    kinds = set()
    for n in range(total_ops + 1):
        model, accepted, crashed = run_trial(nbits, level_bits, 16, base, script, n)
        assert crashed == (n < total_ops)
        recovered, how = model.recover()
        kinds.add(how.split()[0])
        assert missing_bits(accepted, recovered) == 0, (n, how, model.log)
    assert {"consistent", "level"} <= kinds


class StateWith2015Rule(LevelState):
    """The rule as first proposed in 2015: lower only when ``c > X``."""

    def lowered_level(self, first: int, end: int) -> int | None:
        x = self.coarsest_new_level(first, end)
        if x is None or not self.consistent_level > x:
            return None
        return x - 1


@pytest.mark.parametrize("change_level", ["finest", "middle", "zero"])
def test_a_change_at_exactly_the_consistent_level(change_level: str) -> None:
    """X == c must lower the record; the 2015 test ``c > X`` loses the write."""
    # F = 4, 256 bits: level 0 = 64-bit groups, 1 = 16, 2 = 4, 3 = single bits.
    nbits, level_bits = 256, 2
    assert levels.max_level(nbits, level_bits) == 3
    base = [(0, 1)]
    if change_level == "finest":
        script = [("write", 1, 2)]  # c = 3, X = 3
    elif change_level == "middle":
        script = [("write", 4, 5), ("write", 16, 17)]  # X = 2 < 3 gives c = 1; then X = 1
    else:
        script = [("write", 16, 17), ("write", 100, 101)]  # X = 1 gives c = 0; then X = 0
    for state_cls, should_cover in ((LevelState, True), (StateWith2015Rule, False)):
        # Crash right before the close's bitmap flush: the last record update
        # is durable, the bitmap data is not.
        clean, _, _ = run_trial(nbits, level_bits, 8, base, script, None, state_cls=state_cls)
        crash_at = next(i for i, op in enumerate(clean.log) if op.startswith("write data"))
        model, accepted, crashed = run_trial(
            nbits, level_bits, 8, base, script, crash_at, state_cls=state_cls
        )
        assert crashed
        assert model.log[-1] == "flush"
        recovered, _ = model.recover()
        assert (missing_bits(accepted, recovered) == 0) is should_cover, (state_cls, model.log)


def make_tracker(
    policy: FlushPolicy | None, nbits: int = 4096
) -> tuple[Tracker, ModelBackend, FakeClock]:
    clock = FakeClock()
    model = ModelBackend(np.zeros(nbits // 8, dtype=np.uint8), nbits, 6, 64)
    state = LevelState(np.zeros(nbits // 8, dtype=np.uint8), nbits, 6, 64)
    tracker = Tracker(model, state, granularity=1, virtual_size=nbits, policy=policy, clock=clock)
    return tracker, model, clock


def test_policy_on_close_only_never_flushes_before_close() -> None:
    tracker, model, clock = make_tracker(None)
    for i in range(100):
        clock.now += 5
        tracker.write(i * 8, 1)
        tracker.tick()
    assert tracker.stats.flushes == 0
    assert not any(op.startswith("write data") for op in model.log)
    tracker.close()
    assert tracker.stats.flushes == 1


def test_policy_every_seconds() -> None:
    tracker, _, clock = make_tracker(FlushPolicy(every_seconds=1.0))
    tracker.write(0, 1)
    clock.now = 0.5
    tracker.write(8, 1)
    tracker.tick()
    assert tracker.stats.flushes == 0
    clock.now = 1.0
    tracker.tick()
    assert tracker.stats.flushes == 1
    assert tracker.consistent_level == tracker.max_level
    clock.now = 2.5
    tracker.tick()  # nothing changed since: no flush
    assert tracker.stats.flushes == 1
    tracker.write(16, 1)  # due (1.5 s since the flush), but nothing to flush before it
    assert tracker.stats.flushes == 1
    clock.now = 2.9
    tracker.write(24, 1)  # the check on each call flushes the pending change first
    assert tracker.stats.flushes == 2
    tracker.close()


def test_policy_idle_ms() -> None:
    tracker, _, clock = make_tracker(FlushPolicy(idle_ms=100))
    tracker.write(0, 1)
    clock.now = 0.05
    tracker.tick()
    assert tracker.stats.flushes == 0
    clock.now = 0.1
    tracker.tick()
    assert tracker.stats.flushes == 1
    clock.now = 0.12
    tracker.write(8, 1)
    clock.now = 0.15
    tracker.write(16, 1)
    clock.now = 0.2
    tracker.tick()
    assert tracker.stats.flushes == 1
    clock.now = 0.25
    tracker.tick()
    assert tracker.stats.flushes == 2
    tracker.close()


def test_next_deadline_is_what_a_background_flusher_waits_for() -> None:
    tracker, _, clock = make_tracker(FlushPolicy(every_seconds=2.0, idle_ms=100))
    assert tracker.next_deadline() is None  # nothing to flush
    clock.now = 1.0
    tracker.write(0, 1)
    assert tracker.next_deadline() == pytest.approx(1.1)  # idle comes first
    clock.now = 1.1
    tracker.tick()
    assert tracker.stats.flushes == 1
    assert tracker.next_deadline() is None
    tracker.write(8, 1)
    clock.now = 1.15
    tracker.write(16, 1)
    assert tracker.next_deadline() == pytest.approx(1.25)
    tracker.close()
    assert tracker.next_deadline() is None


def test_policy_changed_kib() -> None:
    tracker, _, _ = make_tracker(FlushPolicy(changed_kib=0.0625))  # 64 bytes
    for i in range(63):
        tracker.write(i * 8, 8)  # one new bitmap byte each
    tracker.write(3, 1)  # same byte again: no change
    assert tracker.stats.flushes == 0
    tracker.write(63 * 8, 1)
    assert tracker.stats.flushes == 1
    tracker.close()


def test_policy_combination_and_validation() -> None:
    policy = FlushPolicy(every_seconds=10, changed_kib=1, idle_ms=50)
    assert policy.time_based and not policy.on_close_only
    assert policy.describe() == "every 10 s + after 1 KiB changed + idle 50 ms"
    tracker, _, clock = make_tracker(policy)
    tracker.write(0, 1)
    clock.now = 0.06
    tracker.tick()
    assert tracker.stats.flushes == 1  # idle fired first
    tracker.close()
    with pytest.raises(ValueError, match="idle_ms"):
        FlushPolicy(idle_ms=0)
    with pytest.raises(ValueError, match="every_seconds"):
        FlushPolicy(every_seconds=float("nan"))


def test_background_thread_flushes_on_time() -> None:
    import time as _time

    model = ModelBackend(np.zeros(512, dtype=np.uint8), 4096, 6, 64)
    state = LevelState(np.zeros(512, dtype=np.uint8), 4096, 6, 64)
    tracker = Tracker(
        model, state, granularity=1, virtual_size=4096, policy=FlushPolicy(idle_ms=20)
    )
    tracker.write(0, 1)
    deadline = _time.monotonic() + 5
    while tracker.stats.flushes == 0 and _time.monotonic() < deadline:
        _time.sleep(0.01)
    assert tracker.stats.flushes == 1
    tracker.close()


def test_closed_and_failed_trackers_refuse() -> None:
    tracker, model, _ = make_tracker(None)
    tracker.close()
    tracker.close()  # idempotent
    from qbitmap.track import TrackerClosedError

    with pytest.raises(TrackerClosedError):
        tracker.write(0, 1)
    tracker, model, _ = make_tracker(None)
    model.crash_at = model.ops  # the next operation fails
    with pytest.raises(Crash):
        tracker.write(0, 1)
    with pytest.raises(TrackerClosedError):
        tracker.write(8, 1)
    with pytest.raises(TrackerClosedError):
        tracker.close()
