"""The crash model every crash sweep relies on: CrashingDisk, tested on its own.

A kill stops the process: writes already issued have reached the page cache
and survive.  A power loss also drops what was not flushed -- all of it, or
(with an rng) an arbitrary subset, because the page cache writes back in any
order.  A model that kept unflushed writes would make every power-loss sweep
vacuous, so these tests pin the model down.
"""

from __future__ import annotations

import random

import pytest
from crashdisk import CrashingDisk, SimulatedCrash


class MemoryDisk:
    """A Disk in memory: what reached "the platter", and how many flushes."""

    def __init__(self, size: int = 64) -> None:
        self.data = bytearray(size)
        self.flushes = 0

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def pwrite(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def flush(self) -> None:
        self.flushes += 1

    def size(self) -> int:
        return len(self.data)


def test_operations_are_counted_and_the_crash_stops_everything():
    inner = MemoryDisk()
    disk = CrashingDisk(inner, 2)
    disk.pwrite(0, b"a")  # op 0
    disk.flush()  # op 1
    with pytest.raises(SimulatedCrash):
        disk.pwrite(1, b"b")  # op 2: not performed
    assert inner.data[:2] == b"a\0"
    with pytest.raises(SimulatedCrash):
        disk.flush()  # nothing after the crash either
    assert issubclass(SimulatedCrash, BaseException) and not issubclass(SimulatedCrash, Exception)


def test_a_kill_keeps_every_write_issued_before_it():
    inner = MemoryDisk()
    disk = CrashingDisk(inner, 3)
    disk.pwrite(0, b"x")
    disk.pwrite(8, b"y")
    disk.pwrite(16, b"z")
    with pytest.raises(SimulatedCrash):
        disk.flush()
    assert inner.data[0:1] == b"x" and inner.data[8:9] == b"y" and inner.data[16:17] == b"z"


def test_a_power_loss_drops_what_was_not_flushed():
    inner = MemoryDisk()
    disk = CrashingDisk(inner, 3, lose_unflushed=True)
    disk.pwrite(0, b"kept")  # op 0
    disk.flush()  # op 1: durable
    disk.pwrite(8, b"lost")  # op 2: only in the page cache
    assert disk.pread(8, 4) == b"lost"  # the writer reads its own writes back
    assert inner.data[8:12] == bytes(4)
    with pytest.raises(SimulatedCrash):
        disk.pwrite(16, b"never")  # op 3
    assert inner.data[0:4] == b"kept"
    assert inner.data[8:12] == bytes(4) and inner.data[16:21] == bytes(5)
    assert inner.flushes == 1


def test_a_power_loss_with_an_rng_keeps_an_arbitrary_subset():
    kept_sets = set()
    for seed in range(40):
        inner = MemoryDisk()
        disk = CrashingDisk(inner, 8, lose_unflushed=True, rng=random.Random(seed))
        for i in range(8):
            disk.pwrite(i * 4, bytes([i + 1]) * 4)
        with pytest.raises(SimulatedCrash):
            disk.flush()
        kept = frozenset(i for i in range(8) if inner.data[i * 4] == i + 1)
        for i in range(8):  # each write survives whole or not at all
            assert inner.data[i * 4 : i * 4 + 4] in (bytes([i + 1]) * 4, bytes(4))
        kept_sets.add(kept)
    # Different seeds keep different subsets, including none and some but not all.
    assert len(kept_sets) > 10
    assert any(0 < len(k) < 8 for k in kept_sets)


def test_counting_mode_never_crashes():
    inner = MemoryDisk()
    disk = CrashingDisk(inner, None)
    for i in range(5):
        disk.pwrite(i, b"q")
        disk.flush()
    assert disk.ops == 10 and inner.data[:5] == b"qqqqq"
