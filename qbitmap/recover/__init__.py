"""``qbitmap recover``: plan and apply the recovery of in-use bitmaps through ``qbitmap.store``.

See :mod:`qbitmap.recover.engine` for the phases and what a crash in each
leaves on disk, and :mod:`qbitmap.recover.reference` for the comparison
with a reference copy.
"""

from __future__ import annotations

from qbitmap.recover.engine import MODES, BitmapResult, NoModeError, Options, RecoverReport, recover

__all__ = ["MODES", "BitmapResult", "NoModeError", "Options", "RecoverReport", "recover"]
