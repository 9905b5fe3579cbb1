"""Byte counts for people, shared by messages (check) and renderers."""

from __future__ import annotations


def iec(size: int) -> str:
    """A byte count in IEC units, exact bytes when small (``512 B``, ``64 KiB``, ``1.5 GiB``)."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            break
    else:
        unit = "EiB"
        value /= 1024
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return f"{text} {unit}"
