"""A crash model for tests: a Disk that dies at a chosen write or flush.

Every crash sweep of the suite (recover, the store, the Tracker) and the
consistency-level evaluation under bench/ stop qbitmap's writes with it;
tests/store/test_disk.py pins the model itself down.
"""

from __future__ import annotations

import random

from qbitmap.store.disk import Disk


class SimulatedCrash(BaseException):
    """Raised by :class:`CrashingDisk` in place of the write or flush that "crashed".

    A BaseException, so ``except Exception`` clean-up paths do not run, as
    they would not after a real kill.
    """


class CrashingDisk:
    """A Disk wrapper that crashes at operation number *crash_at*.

    Operations are the writes and flushes in issue order, counted from 0;
    reads are free.  Operation *crash_at* is not performed: it raises
    :class:`SimulatedCrash`, and so does every operation after it.
    ``crash_at=None`` never crashes (use it to count operations: ``ops``).

    Args:
        inner: the Disk that receives the writes that "reached the disk".
        crash_at: the operation number that crashes, or None.
        lose_unflushed: model a power failure instead of a process kill.  Writes
            are then held back until the next flush; at the crash, those still
            pending are dropped -- or, with *rng*, each is kept with
            probability 1/2 (the page cache writes back in any order).
        rng: random source for the subset of pending writes that survive.
    """

    def __init__(
        self,
        inner: Disk,
        crash_at: int | None,
        *,
        lose_unflushed: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.lose_unflushed = lose_unflushed
        self.rng = rng
        self.ops = 0
        self.crashed = False
        self.pending: list[tuple[int, bytes]] = []
        self.log: list[tuple[str, int, int]] = []  # ("write"|"flush", offset, length)

    def _tick(self, kind: str, offset: int = 0, length: int = 0) -> None:
        if self.crashed:
            raise SimulatedCrash(f"{kind} after the crash")
        if self.crash_at is not None and self.ops >= self.crash_at:
            self.crashed = True
            if self.lose_unflushed and self.rng is not None:
                for offset_, data in self.pending:
                    if self.rng.random() < 0.5:
                        self.inner.pwrite(offset_, data)
            self.pending.clear()
            raise SimulatedCrash(f"crash at operation {self.ops} ({kind})")
        self.ops += 1
        self.log.append((kind, offset, length))

    def pread(self, offset: int, length: int) -> bytes:
        if not self.pending:
            return self.inner.pread(offset, length)
        buf = bytearray(self.inner.pread(offset, length))
        end = offset + length
        for w_offset, data in self.pending:
            w_end = w_offset + len(data)
            if w_end <= offset or w_offset >= end:
                continue
            if w_end > offset + len(buf):
                buf.extend(bytes(min(w_end, end) - offset - len(buf)))
            lo = max(offset, w_offset)
            hi = min(end, w_end)
            buf[lo - offset : hi - offset] = data[lo - w_offset : hi - w_offset]
        return bytes(buf)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._tick("write", offset, len(data))
        if self.lose_unflushed:
            self.pending.append((offset, bytes(data)))
        else:
            self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._tick("flush")
        for offset, data in self.pending:
            self.inner.pwrite(offset, data)
        self.pending.clear()
        self.inner.flush()

    def size(self) -> int:
        size = self.inner.size()
        for offset, data in self.pending:
            size = max(size, offset + len(data))
        return size
