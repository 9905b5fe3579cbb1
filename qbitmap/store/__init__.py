"""The only code that writes images: locked Disk, cluster allocator, crash-safe commits.

Public API (stable; ``qbitmap.track`` and ``qbitmap.recover`` build on it):

* :class:`WriteSession` -- ``with WriteSession.open(path) as s:`` the image
  locked like a QEMU writer, validated, with a Disk and an Allocator; stage
  new clusters, :meth:`~WriteSession.commit_header` (one write of cluster
  0, flushed on both sides), then :meth:`~WriteSession.free` the old ones.
* :class:`Allocator`, :class:`Extent` -- refcount-based cluster allocation.
* :class:`Disk`, :class:`FileDisk`, :class:`CrashingDisk`,
  :class:`SimulatedCrash`, :class:`OverlayDisk` -- the I/O seam.
* :class:`ImageLock`, :func:`foreign_lock_bytes` -- QEMU's lock bytes.
* helpers that build extension data: :func:`bitmaps_extension_bytes`,
  :func:`levels_extension_bytes`, :func:`new_level_record`, and the extent
  helpers :func:`entry_extents`, :func:`directory_extent`.
"""

from __future__ import annotations

from qbitmap.store.alloc import AllocationError, Allocator, Extent
from qbitmap.store.disk import CrashingDisk, Disk, DiskStats, FileDisk, SimulatedCrash
from qbitmap.store.lock import (
    QEMU_LOCK_BYTES,
    WRITER_LOCK_BYTES,
    ImageLock,
    busy_message,
    foreign_lock_bytes,
)
from qbitmap.store.overlay import OverlayDisk
from qbitmap.store.session import (
    KNOWN_AUTOCLEAR,
    NewBitmap,
    Step,
    WriteSession,
    bitmaps_extension_bytes,
    directory_extent,
    entry_extents,
    levels_extension_bytes,
    new_level_record,
    validate_for_write,
)

__all__ = [
    "KNOWN_AUTOCLEAR",
    "QEMU_LOCK_BYTES",
    "WRITER_LOCK_BYTES",
    "AllocationError",
    "Allocator",
    "CrashingDisk",
    "Disk",
    "DiskStats",
    "Extent",
    "FileDisk",
    "ImageLock",
    "NewBitmap",
    "OverlayDisk",
    "SimulatedCrash",
    "Step",
    "WriteSession",
    "bitmaps_extension_bytes",
    "busy_message",
    "directory_extent",
    "entry_extents",
    "foreign_lock_bytes",
    "levels_extension_bytes",
    "new_level_record",
    "validate_for_write",
]
