"""``qbitmap recover``: plan and apply the recovery of in-use bitmaps through ``qbitmap.store``.

See :mod:`qbitmap.recover.engine` for the phases and what a crash in each
leaves on disk, and :mod:`qbitmap.recover.reference` for the comparison
with a reference copy.  Besides recovering stale bitmaps, one run can add
bitmaps with every change marked and re-enable disabled ones
(:class:`Options` ``create`` and ``enable``): the repairs libvirt's
checkpoints need.  :func:`prepare` decides and computes a run on a locked
image without writing, so that several images can be refused together.
"""

from __future__ import annotations

from qbitmap.recover.engine import (
    MODES,
    BitmapResult,
    NewBitmap,
    NoModeError,
    Options,
    RecoverReport,
    Recovery,
    prepare,
    recover,
)

__all__ = [
    "MODES",
    "BitmapResult",
    "NewBitmap",
    "NoModeError",
    "Options",
    "RecoverReport",
    "Recovery",
    "prepare",
    "recover",
]
