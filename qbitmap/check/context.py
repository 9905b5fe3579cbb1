"""State shared by the check modules while one image is checked.

Each module reads what the earlier ones found (the bitmaps extension, the
directory entries, the tables) and adds its own, so every structure is read
once.  Nothing here prints or raises for corruption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from qbitmap.format import BitmapEntry, BitmapsExtension, Image

if TYPE_CHECKING:
    from qbitmap.format.references import ReferenceMap


@dataclass
class Context:
    """What the check has learnt so far about one image."""

    image: Image
    held_locks: tuple[int, ...] = ()
    scope: str = "full"  # "full" or "open" (see qbitmap.check.SCOPES)
    # The bitmaps extension (first one) if its data could be parsed, and whether
    # QEMU would load bitmaps from it (v3, autoclear bit 0 set, length 24).
    extension: BitmapsExtension | None = None
    honored: bool = False
    # The extension's fields are good enough to read the directory at all.
    directory_readable: bool = False
    entries: list[BitmapEntry] = field(default_factory=list)
    # The walk met no structural problem (every entry parsed, count right).
    directory_complete: bool = False
    # Bitmap tables that were read, by directory index (all entries, native uint64).
    tables: dict[int, np.ndarray] = field(default_factory=dict)
    refmap: ReferenceMap | None = None
    # The bitmaps of an extension QEMU ignores (autoclear bit 0 clear, or a v2 image),
    # whether recover can bring them back, and their clusters (not reported as leaks).
    ignored: list[BitmapEntry] = field(default_factory=list)
    ignored_recoverable: bool = False
    ignored_leaks: np.ndarray | None = None

    @property
    def live(self) -> bool:
        return bool(self.held_locks)

    @property
    def cluster_size(self) -> int:
        return self.image.cluster_size
