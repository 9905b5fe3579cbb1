"""The qcow2 format layer: construct schemas, typed model, bounded readers.

Nothing here prints, exits or imports click/rich.  Higher layers
(``check``, ``recover``, ``track``, the CLI) import from this package.
"""

from __future__ import annotations

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
    select_entries,
)

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
    "select_entries",
    "table_entry_problem",
    "unique_sorted",
]
