"""Child process for the real-crash tests: track random writes until killed.

Usage: python tracker_child.py IMAGE LOG SEED LEVEL_BITS EXIT_AT

Every write whose ``Tracker.write`` returned is appended to LOG as
"OFFSET LENGTH" (one os.write each, so a SIGKILL leaves whole lines); the
first line is "open" once the Tracker is open.  EXIT_AT >= 0 makes the
process die with ``os._exit`` right before its write-or-flush number EXIT_AT
on the image (so the death lands at an exact protocol step, e.g. between a
record update and a bitmap flush); -1 runs until the parent's SIGKILL.
"""

from __future__ import annotations

import os
import random
import sys

from qbitmap.store.disk import Disk
from qbitmap.track import FlushPolicy, Tracker


class ExitAtOp:
    """A Disk wrapper that ends the process before operation *n*."""

    def __init__(self, inner: Disk, n: int) -> None:
        self.inner, self.n, self.ops = inner, n, 0

    def _tick(self) -> None:
        if self.ops == self.n:
            os._exit(17)
        self.ops += 1

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._tick()
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._tick()
        self.inner.flush()

    def size(self) -> int:
        return self.inner.size()


def main() -> None:
    image, log_path, seed, level_bits, exit_at = sys.argv[1:6]
    rng = random.Random(int(seed))
    n = int(exit_at)
    wrapper = (lambda d: ExitAtOp(d, n)) if n >= 0 else None
    policy = FlushPolicy(changed_kib=rng.choice([0.0625, 0.25, 1]), idle_ms=rng.choice([None, 5]))
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    tracker = Tracker.open(
        image, "b0", level_bits=int(level_bits), policy=policy, disk_wrapper=wrapper
    )
    os.write(log, b"open\n")
    size = tracker.virtual_size
    while True:
        if rng.random() < 0.3:
            offset = rng.randrange(0, 8) * (size // 8) + rng.randrange(0, 64) * 4096
        else:
            offset = rng.randrange(0, size // 512) * 512
        length = min(rng.choice([512, 4096, 65536, 1 << 20]), size - offset)
        tracker.write(offset, length)
        os.write(log, f"{offset} {length}\n".encode())
        if rng.random() < 0.05:
            tracker.flush()


if __name__ == "__main__":
    main()
