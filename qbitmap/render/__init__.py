"""Renderers: report data -> rich renderables or machine text.  Pure functions."""

from __future__ import annotations

from qbitmap.units import iec

__all__ = ["hexoff", "iec"]


def hexoff(offset: int | None) -> str:
    return "-" if offset is None else f"{offset:#x}"
