"""When the Tracker writes the bitmap to disk (spec, "The writer's protocol", step 4).

The 2015 discussion listed: on close only; every N seconds; when M KiB of
bitmap data changed; when the disk has been idle for N ms; or a combination.
A :class:`FlushPolicy` holds any of the last three (all None means "on close
only"); any condition that is met triggers a flush.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """Conditions that make the Tracker flush the bitmap before close.

    Attributes:
        every_seconds: flush when this many seconds have passed since the last
            flush (or the open) and something changed since.
        changed_kib: flush as soon as this many KiB of bitmap data (distinct
            bytes of the on-disk bitmap) differ from what was last flushed.
        idle_ms: flush when no guest write has been announced for this many
            milliseconds and something changed since the last flush.
    """

    every_seconds: float | None = None
    changed_kib: float | None = None
    idle_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("every_seconds", "changed_kib", "idle_ms"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"FlushPolicy.{name} must be a positive number, not {value!r}")

    @property
    def on_close_only(self) -> bool:
        return self.every_seconds is None and self.changed_kib is None and self.idle_ms is None

    @property
    def time_based(self) -> bool:
        return self.every_seconds is not None or self.idle_ms is not None

    def size_due(self, changed_bytes: int) -> bool:
        """The "M KiB changed" condition."""
        return self.changed_kib is not None and changed_bytes >= self.changed_kib * 1024

    def time_due(self, now: float, last_flush: float, last_write: float | None) -> bool:
        """The time-based conditions (the caller checks that something changed)."""
        if self.every_seconds is not None and now - last_flush >= self.every_seconds:
            return True
        if self.idle_ms is not None and last_write is not None:
            return (now - last_write) * 1000 >= self.idle_ms
        return False

    def next_deadline(self, last_flush: float, last_write: float | None) -> float | None:
        """The earliest clock value at which :meth:`time_due` can become true."""
        times = []
        if self.every_seconds is not None:
            times.append(last_flush + self.every_seconds)
        if self.idle_ms is not None and last_write is not None:
            times.append(last_write + self.idle_ms / 1000)
        return min(times) if times else None

    def describe(self) -> str:
        parts = []
        if self.every_seconds is not None:
            parts.append(f"every {self.every_seconds:g} s")
        if self.changed_kib is not None:
            parts.append(f"after {self.changed_kib:g} KiB changed")
        if self.idle_ms is not None:
            parts.append(f"idle {self.idle_ms:g} ms")
        return " + ".join(parts) if parts else "on close"
