"""The qcow2 format layer: construct schemas, typed model, bounded readers.

Nothing here prints, exits or imports click/rich.  Higher layers
(``check``, ``recover``, ``track``, the CLI) import from this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbitmap.format.bitmap import (
    Chunk,
    Geometry,
    bit_runs,
    check_data_size,
    dirty_bytes,
    extent_arrays,
    extent_blocks,
    extents,
    geometry_of,
    iter_chunks,
    popcount,
    read_bits,
    run_arrays,
    run_blocks,
    table_entry_problem,
    unique_sorted,
)
from qbitmap.format.image import Directory, Image, LevelsExtension, parse_levels_extension
from qbitmap.format.model import (
    AutoclearFeature,
    BitmapEntry,
    BitmapFlag,
    BitmapsExtension,
    CompatibleFeature,
    Extension,
    Header,
    HeaderArea,
    IncompatibleFeature,
    LevelRecord,
)

if TYPE_CHECKING:
    from qbitmap.format.refcount import Refcounts


def __getattr__(name: str) -> object:
    # Refcounts is imported on first use: dump never needs it.
    if name == "Refcounts":
        from qbitmap.format.refcount import Refcounts

        return Refcounts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AutoclearFeature",
    "BitmapEntry",
    "BitmapFlag",
    "BitmapsExtension",
    "Chunk",
    "CompatibleFeature",
    "Directory",
    "Extension",
    "Geometry",
    "Header",
    "HeaderArea",
    "Image",
    "IncompatibleFeature",
    "LevelRecord",
    "LevelsExtension",
    "Refcounts",
    "bit_runs",
    "check_data_size",
    "dirty_bytes",
    "extent_arrays",
    "extent_blocks",
    "extents",
    "geometry_of",
    "iter_chunks",
    "parse_levels_extension",
    "popcount",
    "read_bits",
    "run_arrays",
    "run_blocks",
    "table_entry_problem",
    "unique_sorted",
]
