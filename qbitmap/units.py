"""Byte counts for people, shared by messages (check) and renderers."""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def iec(size: int) -> str:
    """A byte count in IEC units, exact bytes when small (``512 B``, ``64 KiB``, ``1.5 GiB``)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    index = -1
    while value >= 1024 and index < len(_UNITS) - 1:
        value /= 1024
        index += 1
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{text} {_UNITS[index]}"
