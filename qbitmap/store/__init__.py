"""The only code that writes images: locked Disk, cluster allocator, crash-safe commits.

Public API (stable; ``qbitmap.track`` and ``qbitmap.recover`` build on it):

* :class:`WriteSession` -- ``with WriteSession.open(path) as s:`` the image
  locked like a QEMU writer, validated, with a Disk and an Allocator; stage
  new clusters, :meth:`~WriteSession.commit_header` (one write of cluster
  0, flushed on both sides), then :meth:`~WriteSession.free` the old ones.
* :class:`Allocator`, :class:`Extent` -- refcount-based cluster allocation.
* :class:`Disk`, :class:`FileDisk`, :class:`OverlayDisk` -- the I/O seam.
* :class:`ImageLock` -- QEMU's lock bytes held while writing (see :mod:`qbitmap.lockbytes`).
* helpers that build extension data: :func:`bitmaps_extension_bytes`,
  :func:`levels_extension_bytes`, :func:`new_level_record`, and the extent
  helpers :func:`entry_extents`, :func:`directory_extent`.
"""

from __future__ import annotations

from qbitmap.store.alloc import AllocationError, Allocator, Extent
from qbitmap.store.disk import Disk, DiskStats, FileDisk
from qbitmap.store.lock import ImageLock, busy_message
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
    "AllocationError",
    "Allocator",
    "Disk",
    "DiskStats",
    "Extent",
    "FileDisk",
    "ImageLock",
    "NewBitmap",
    "OverlayDisk",
    "Step",
    "WriteSession",
    "bitmaps_extension_bytes",
    "busy_message",
    "directory_extent",
    "entry_extents",
    "levels_extension_bytes",
    "new_level_record",
    "validate_for_write",
]
