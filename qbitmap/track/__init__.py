"""Tracking guest writes in a persistent bitmap with a consistency-level record.

``Tracker.open(path, bitmap)`` opens a qcow2 image, takes QEMU's lock bytes
and maintains the record of man/qbitmap-levels.5 while the
caller announces guest writes; ``close()`` leaves a normal consistent bitmap.
"""

from __future__ import annotations

from qbitmap.track.policy import FlushPolicy
from qbitmap.track.tracker import Tracker, TrackerClosedError, TrackerStats

__all__ = ["FlushPolicy", "Tracker", "TrackerClosedError", "TrackerStats"]
