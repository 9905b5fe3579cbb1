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

from typing import TYPE_CHECKING, Any

from qbitmap.recover.modes import MODES

if TYPE_CHECKING:
    from qbitmap.recover.engine import (
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


def __getattr__(name: str) -> Any:
    # The engine (numpy, the whole format layer) loads on first use, so that
    # the command line can read MODES at start-up without it.
    if name in __all__:
        from qbitmap.recover import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
