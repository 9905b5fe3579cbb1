"""``dump``'s map: where on the disk a bitmap's dirty bytes lie, as one line of shaded cells.

The disk is cut into as many cells as the line is wide (cell *j* covers
guest bytes ``[j*size//cells, (j+1)*size//cells)``, so the cells differ in
length by one byte at most and cover the disk exactly); each cell is
shaded by the fraction of its bytes the bitmap marks dirty.  A cell with
any dirty byte is never shown clean, and only a wholly dirty cell is shown
full.  Block characters (``·░▒▓█``) when the locale is UTF-8, else ASCII
(``.:+*#``).

The arithmetic (:func:`cell_bounds`, :func:`cell_dirty_bytes`,
:func:`shade_levels`) is separate from the drawing, so it can be tested
against ranges QEMU wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

from qbitmap.render import iec, printable

if TYPE_CHECKING:
    from rich.text import Text

#: Shades from clean to wholly dirty.
UTF8_SHADES = "·░▒▓█"
ASCII_SHADES = ".:+*#"


def cell_bounds(virtual_size: int, width: int) -> list[int]:
    """The ``cells + 1`` guest offsets that bound the cells: 0 first, *virtual_size* last.

    As many cells as *width*, but never more than the disk has bytes (an
    empty disk has no cell).
    """
    cells = max(0, min(width, virtual_size))
    return [j * virtual_size // cells for j in range(cells + 1)] if cells else [0]


def cell_dirty_bytes(
    bounds: Sequence[int], dirty_below: Callable[[Sequence[int]], list[int]]
) -> list[int]:
    """Dirty bytes of each cell, from a source of the dirty bytes below given offsets."""
    below = dirty_below(bounds)
    return [b - a for a, b in pairwise(below)]


def shade_levels(dirty: Sequence[int], bounds: Sequence[int]) -> list[int]:
    """Each cell's shade, 0 (clean) to 4 (wholly dirty); 1..3 for under a third, two thirds, all."""
    levels = []
    for j, count in enumerate(dirty):
        length = bounds[j + 1] - bounds[j]
        if count <= 0:
            levels.append(0)
        elif count >= length:
            levels.append(4)
        else:
            levels.append(1 + min(2, 3 * count // length))
    return levels


def strip(levels: Sequence[int], shades: str) -> str:
    return "".join(shades[level] for level in levels)


def map_lines(
    name: str,
    virtual_size: int,
    dirty: Sequence[int],
    bounds: Sequence[int],
    *,
    stale: bool,
    shades: str = UTF8_SHADES,
) -> list[Text]:
    """Title, strip and offset labels of one bitmap's map, as rich Text lines."""
    from rich.text import Text

    cells = len(dirty)
    title = Text.assemble(("Map of ", "bold"), (f"'{printable(name)}'", "bold"))
    if cells:
        title.append(f" ({cells} cells of {iec(virtual_size // cells)})")
    if stale:
        title.append(" STALE", style="bold yellow")
    if not cells:
        return [title, Text("  (empty disk)")]
    line = Text(strip(shade_levels(dirty, bounds), shades), style="yellow" if stale else "")
    left, right = "0", iec(virtual_size)
    labels = Text(left + " " * max(1, cells - len(left) - len(right)) + right)
    return [title, line, labels]
