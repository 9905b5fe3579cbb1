"""Renderers: report data -> rich renderables or machine text.  Pure functions."""

from __future__ import annotations


def iec(size: int) -> str:
    """A byte count in IEC units, exact bytes when small (``64 KiB``, ``1.5 GiB``)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def hexoff(offset: int | None) -> str:
    return "-" if offset is None else f"{offset:#x}"
