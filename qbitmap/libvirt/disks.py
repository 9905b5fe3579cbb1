"""One disk of a domain: its backing chain opened read-only and every layer checked.

A disk whose top image a writer holds (lock bytes 101 or 103, what a
running QEMU holds) is not read further: its bitmaps live in the writer's
memory.  :class:`ImageCache` keeps each image's check for one run, so a
backing file shared by several disks is checked once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from qbitmap import lockbytes
from qbitmap.check import CheckReport, check_image
from qbitmap.check.chain import LayerView, bitmaps_ignored
from qbitmap.errors import QbitmapError
from qbitmap.format.chain import BackingChain, ChainError, open_chain
from qbitmap.libvirt.definitions import DiskDefinition
from qbitmap.lockbytes import writer_present


class ImageCache:
    """Check results per image file for one run, so a shared backing file is checked once."""

    def __init__(self) -> None:
        self._reports: dict[tuple[int, int, int, int], CheckReport] = {}

    def report(self, fd: int, check: Any) -> CheckReport:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._reports:
            self._reports[key] = check()
        return self._reports[key]


@dataclass
class DiskState:
    """One disk of the domain definition, with its backing chain examined."""

    definition: DiskDefinition
    not_checkable: str | None = None  # why qbitmap cannot look at it
    error: str | None = None  # the top image could not be opened
    views: list[LayerView] = field(default_factory=list)
    chain_error: ChainError | None = None
    held: tuple[int, ...] = ()  # lock bytes of the top image another process holds

    @property
    def target(self) -> str:
        return self.definition.target

    @property
    def running(self) -> bool:
        return writer_present(self.held)

    def to_dict(self) -> dict[str, Any]:
        d = self.definition
        return {
            "target": d.target,
            "device": d.device,
            "type": d.type,
            "format": d.format,
            "source": d.source,
            "readonly": d.readonly,
            "checkable": self.not_checkable is None,
            "not_checkable_reason": self.not_checkable,
            "error": self.error,
            "held_lock_bytes": list(self.held),
            "backing_chain": [
                {
                    "index": v.index,
                    "filename": v.filename,
                    "format": v.layer.format,
                    "bitmaps_ignored": v.bitmaps_ignored,
                    "check_exit_code": None if v.report is None else v.report.exit_code,
                    "bitmaps": []
                    if v.report is None
                    else [
                        {
                            "name": b.name,
                            "status": b.status,
                            "flags": [] if b.entry is None else b.entry.flag_words,
                            "granularity": None
                            if b.entry is None or not 0 <= b.entry.granularity_bits <= 63
                            else b.entry.granularity,
                        }
                        for b in v.report.bitmaps
                    ],
                }
                for v in self.views
            ],
            "chain_error": None
            if self.chain_error is None
            else {"kind": self.chain_error.kind, "message": self.chain_error.message},
        }


def _chain_views(chain: BackingChain, cache: ImageCache) -> list[LayerView]:
    views = []
    for layer in chain.layers:
        image = chain.images.get(layer.index)
        report = None
        if image is not None:
            # libvirt's verdict depends on what QEMU checks at open and on the flags: the
            # open scope (the deep walk is 'qbitmap check', and recover runs it before writing).
            report = cache.report(image.fd, lambda image=image: check_image(image, scope="open"))
        views.append(LayerView(layer, report, bitmaps_ignored(layer, chain)))
    return views


def examine_disk(disk: DiskDefinition, cache: ImageCache) -> DiskState:
    """Open *disk*'s backing chain read-only and check every layer (no lock taken).

    A disk whose top image a writer holds is returned with its lock bytes
    and no layers: its bitmaps live in the writer's memory.
    """
    state = DiskState(disk)
    reason = disk.not_checkable_reason()
    if reason is not None:
        state.not_checkable = reason
        return state
    path = disk.local_path
    assert path is not None
    try:
        chain = open_chain(path)
    except QbitmapError as exc:
        message = str(exc)
        state.error = message if message.startswith(str(path)) else f"{path}: {message}"
        return state
    with chain:
        state.held = lockbytes.probe(chain.top.fd)
        if state.running:
            return state
        state.views = _chain_views(chain, cache)
        state.chain_error = chain.error
    return state


__all__ = ["DiskState", "ImageCache", "examine_disk"]
