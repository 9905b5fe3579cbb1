"""Renderers: report data -> rich renderables or machine text.  Pure functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbitmap.units import iec

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["hexoff", "iec", "keep_whole", "printable", "section_table"]


def hexoff(offset: int | None) -> str:
    return "-" if offset is None else f"{offset:#x}"


def printable(text: str) -> str:
    """*text* safe for a terminal: every character that is not printable shown as an escape.

    Names and messages come from the image (and file names from the command
    line), so they may hold escape sequences, newlines, bidi overrides
    (U+202A..U+202E, U+2066..U+2069) or zero-width characters, any of which
    would let an image rewrite what a table or an error line says.  Those
    appear as Python string escapes (``\\x1b``, ``\\n``, ``\\u202e``); bytes
    of a file name that are not valid in the locale's encoding (held as lone
    surrogates by ``os.fsdecode``) appear as ``\\xNN``.  Printable text is
    returned as it is.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def section_table(title: str | None, **options: Any) -> Table:
    """A rich table as every human view draws one: its title at the left, a rule under the
    header.  *options* go to :class:`rich.table.Table` (``pad_edge``, ``show_header``...).

    rich is imported here, when a table is drawn: JSON and lines never import it.
    """
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, **options)


def keep_whole(table: Table) -> Table:
    """Give every ``no_wrap`` column of *table* a minimum width of its widest cell.

    rich measures a table by the widest word of each cell, then, on a console
    narrower than the columns that may not wrap, shrinks every column and cuts
    text with an ellipsis.  With these minimum widths the table's measured
    minimum covers its no-wrap columns whole, and :meth:`qbitmap.ui.Ui.print`
    widens its output to that minimum: a name in a no-wrap column is never cut.
    Returns *table*.
    """
    from rich.cells import cell_len
    from rich.text import Text

    for column in table.columns:
        if not column.no_wrap:
            continue
        widest = 0
        for cell in (column.header, *column.cells):
            text = cell.plain if isinstance(cell, Text) else str(cell)
            widest = max(widest, *(cell_len(line) for line in text.splitlines() or [""]))
        column.min_width = max(column.min_width or 0, widest)
    return table
