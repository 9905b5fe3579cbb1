"""The Tracker: a writer that keeps the consistency-level invariant true on disk.

Protocol (man/qbitmap-levels.5, WRITER PROTOCOL):

1. Opening: record with ``c = max_level`` and autoclear bit 63, flush; then
   ``in_use`` on the bitmap entry, flush (``Backend.begin``).
2. ``write(offset, length)``, called *before* the guest data write: ``X`` is
   the coarsest level whose bit goes from 0 to 1 in ``T``; if ``X <= c``,
   ``c = X - 1`` is made durable before ``write`` returns.
3. Flushing: ``T`` to the bitmap's data clusters, flush, then
   ``c = max_level``, flush (``Backend.store`` then ``Backend.set_level``).
4. Closing: flush, clear ``in_use``, remove the record, clear bit 63 if no
   record remains (``Backend.end``).

The protocol logic lives here; where the bytes go is a :class:`Backend`'s
business (``qbitmap.track.backend`` for a qcow2 image, an in-memory model in
the tests), so the crash tests exercise this very code.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from qbitmap import levels
from qbitmap.errors import TrackerClosedError
from qbitmap.store.disk import Disk
from qbitmap.track.backend import ImageBackend
from qbitmap.track.policy import FlushPolicy
from qbitmap.track.state import LevelState, bit_range

Clock = Callable[[], float]


class Backend(Protocol):
    """Durable storage for one tracked bitmap; every method returns once its writes are flushed."""

    def begin(self, consistent_level: int) -> None:
        """Write the record with *consistent_level* and autoclear bit 63, flush; set in_use, flush."""

    def set_level(self, consistent_level: int) -> None:
        """Rewrite the record's consistent_level in place and flush."""

    def store(self, bits: np.ndarray, clusters: Sequence[int]) -> None:
        """Write data clusters *clusters* of *bits* (allocating as needed) and flush."""

    def end(self) -> None:
        """Clear in_use, flush; remove the record (and bit 63 if none remain), flush; release."""

    def abandon(self) -> None:
        """Release locks and files without touching the image."""


@dataclass(slots=True)
class TrackerStats:
    """What the Tracker did, for the evaluation and for callers who care."""

    guest_writes: int = 0  # write() calls
    level_updates: int = 0  # consistent_level lowered on disk (step 2)
    flushes: int = 0  # bitmap flushes that wrote data (step 3)
    clusters_written: int = 0  # bitmap data clusters written by those flushes


class Tracker:
    """Tracks guest writes in a persistent bitmap, maintaining a consistency-level record.

    Use :meth:`open` for a qcow2 image, or construct it around any
    :class:`Backend` (the tests' in-memory model).  Thread-safe: a lock
    serialises ``write``, ``flush``, ``tick`` and the background flusher.
    """

    def __init__(
        self,
        backend: Backend,
        state: LevelState,
        *,
        granularity: int,
        virtual_size: int,
        policy: FlushPolicy | None = None,
        clock: Clock | None = None,
        background: bool | None = None,
    ) -> None:
        self._backend = backend
        self._state = state
        self.granularity = granularity
        self.virtual_size = virtual_size
        self.policy = policy or FlushPolicy()
        self._clock = clock or time.monotonic
        self.stats = TrackerStats()
        self._lock = threading.RLock()
        self._closed = False
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a write happened: the flusher recomputes its deadline
        self._thread_error: BaseException | None = None
        try:
            backend.begin(state.max_level)
        except BaseException:
            backend.abandon()
            raise
        state.consistent_level = state.max_level
        self._last_flush = self._clock()
        self._last_write: float | None = None
        if background is None:
            background = self.policy.time_based and clock is None
        if background and self.policy.time_based:
            self._thread = threading.Thread(
                target=self._flusher, name="qbitmap-tracker-flush", daemon=True
            )
            self._thread.start()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        bitmap: str | bytes,
        *,
        level_bits: int = levels.DEFAULT_LEVEL_BITS,
        policy: FlushPolicy | None = None,
        clock: Clock | None = None,
        background: bool | None = None,
        disk_wrapper: Callable[[Disk], Disk] | None = None,
    ) -> Tracker:
        """Open *bitmap* of the qcow2 image *path* for tracking (a context manager too).

        The bitmap must exist and be consistent (not in use); its contents
        are where ``T`` starts.  QEMU's lock bytes are held until
        :meth:`close`.  On return the record (``c = max_level``), autoclear
        bit 63 and ``in_use`` are on disk.

        Args:
            path: the qcow2 image.
            bitmap: the bitmap's name.
            level_bits: ``log2`` of the fan-out, 1..16 (6 is QEMU's HBitmap).
            policy: when to flush before close (default: on close only).
            clock: a monotonic clock in seconds (tests inject a fake one).
            background: run a thread that applies time-based policies; by
                default on when the policy has one and *clock* is the real clock.
            disk_wrapper: wraps the image's Disk (tests inject crashes).

        Raises:
            ImageBusyError: another process holds the image.
            UsageError: no such bitmap, or *level_bits* out of range.
            RefusedError: the bitmap is in use or its metadata is unsound.
        """
        backend = ImageBackend.open(path, bitmap, level_bits=level_bits, disk_wrapper=disk_wrapper)
        try:
            geo = backend.geometry
            state = LevelState(backend.initial_bits, geo.nbits, level_bits, geo.cluster_size)
        except BaseException:
            backend.abandon()
            raise
        return cls(
            backend,
            state,
            granularity=geo.granularity,
            virtual_size=geo.virtual_size,
            policy=policy,
            clock=clock,
            background=background,
        )

    # -- properties ----------------------------------------------------------------

    @property
    def consistent_level(self) -> int:
        """The consistent level the on-disk record claims right now."""
        return self._state.consistent_level

    @property
    def max_level(self) -> int:
        return self._state.max_level

    @property
    def level_bits(self) -> int:
        return self._state.level_bits

    @property
    def nbits(self) -> int:
        return self._state.nbits

    @property
    def closed(self) -> bool:
        return self._closed

    def bits(self) -> np.ndarray:
        """A copy of ``T``, the true bitmap."""
        with self._lock:
            return self._state.bits.copy()

    # -- the protocol ----------------------------------------------------------------

    def write(self, offset: int, length: int) -> None:
        """Announce a guest write of *length* bytes at *offset*; call before writing the data.

        When this returns, the on-disk record is low enough that a crash at
        any later instant loses nothing of this write.
        """
        first, end = bit_range(offset, length, self.granularity, self.virtual_size)
        with self._lock:
            self._usable()
            now = self._clock()
            self._run(self._maybe_flush_on_time, now)
            lowered = self._state.lowered_level(first, end)
            if lowered is not None:
                self._run(self._backend.set_level, lowered)
                self._state.consistent_level = lowered
                self.stats.level_updates += 1
            self._state.set_range(first, end)
            self.stats.guest_writes += 1
            self._last_write = now
            if self.policy.size_due(self._state.changed_bytes):
                self._run(self._flush_locked)
        self._wake.set()

    def flush(self) -> None:
        """Write ``T`` to the image and let the record claim ``max_level`` again."""
        with self._lock:
            self._usable()
            self._run(self._flush_locked)

    def tick(self) -> None:
        """Apply the time-based flush conditions now (the background thread calls this)."""
        with self._lock:
            self._usable()
            self._run(self._maybe_flush_on_time, self._clock())

    def next_deadline(self) -> float | None:
        """The clock value at which a time-based policy flushes; None if nothing is pending."""
        with self._lock:
            if not self._state.has_changes or self._closed:
                return None
            return self.policy.next_deadline(self._last_flush, self._last_write)

    def close(self) -> None:
        """Flush, clear in_use and remove the record: QEMU then sees a consistent bitmap."""
        self._stop_thread()
        with self._lock:
            if self._closed:
                return
            if self._failed is not None:
                self._closed = True
                self._backend.abandon()
                raise TrackerClosedError(
                    f"the tracker failed earlier: {self._failed}"
                ) from self._failed
            try:
                self._flush_locked()
                self._backend.end()
            except BaseException as exc:
                self._failed = exc
                self._backend.abandon()
                raise
            finally:
                self._closed = True

    def abandon(self) -> None:
        """Stop tracking without the closing steps (the record keeps protecting the bitmap)."""
        self._stop_thread()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._backend.abandon()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._failed is not None:
            self.abandon()
        else:
            self.close()

    # -- internals ---------------------------------------------------------------------

    def _flush_locked(self) -> None:
        state = self._state
        if state.has_changes:
            clusters = state.dirty_clusters
            self._backend.store(state.bits, clusters)
            self.stats.flushes += 1
            self.stats.clusters_written += len(clusters)
        if state.consistent_level != state.max_level:
            self._backend.set_level(state.max_level)
        state.mark_flushed()
        self._last_flush = self._clock()

    def _maybe_flush_on_time(self, now: float) -> None:
        if self._state.has_changes and self.policy.time_due(
            now, self._last_flush, self._last_write
        ):
            self._flush_locked()

    def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            self._failed = exc
            raise

    def _usable(self) -> None:
        if self._thread_error is not None and self._failed is None:
            self._failed = self._thread_error
        if self._closed:
            raise TrackerClosedError("the tracker is closed")
        if self._failed is not None:
            raise TrackerClosedError(
                f"the tracker failed earlier: {self._failed}"
            ) from self._failed

    def _flusher(self) -> None:
        while not self._stop.is_set():
            deadline = self.next_deadline()
            wait = 1.0 if deadline is None else max(0.0, deadline - self._clock())
            self._wake.wait(wait)
            self._wake.clear()
            try:
                with self._lock:
                    if self._closed or self._failed is not None or self._stop.is_set():
                        return
                    self._maybe_flush_on_time(self._clock())
            except BaseException as exc:  # noqa: BLE001 - reported by the next call
                self._thread_error = exc
                return

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
