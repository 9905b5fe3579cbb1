"""What ``qbitmap dump --backing-chain`` reports: every layer's dump and each name's union.

:func:`chain_dump_report` runs :func:`qbitmap.inspect.dump_report` on every
qcow2 layer of a backing chain (a raw bottom layer is listed as such) and,
per bitmap name, lists the layers that have it and -- with extents -- the
union of its dirty ranges over those layers, cut at the top image's size:
what a libvirt incremental backup from a checkpoint of that name copies
(libvirt merges the checkpoint's bitmaps of every layer into the one the
backup exports).  Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qbitmap.errors import QbitmapError, UsageError
from qbitmap.format.chain import BackingChain, ChainError, ChainLayer
from qbitmap.inspect import DumpReport, Extents, ExtentSource, dump_report


@dataclass
class LayerDump:
    """One layer: its place in the chain and its dump (None for raw layers or on error)."""

    layer: ChainLayer
    report: DumpReport | None
    error: str | None = None  # why the layer could not be dumped

    def names(self) -> list[str]:
        return [] if self.report is None else [b["name"] for b in self.report.info["bitmaps"]]


@dataclass
class ChainBitmap:
    """One bitmap name over the chain."""

    name: str
    present_in: tuple[int, ...]  # layer indices, top first
    dirty_bytes: int | None = None  # of the union, with extents
    extents: Extents | None = None  # the union, sorted and merged

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "present_in": list(self.present_in),
            "dirty_bytes": self.dirty_bytes,
        }


@dataclass
class ChainDumpReport:
    """Everything ``dump --backing-chain`` shows."""

    filename: str
    layers: list[LayerDump]
    error: ChainError | None
    bitmaps: list[ChainBitmap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """A layer could not be read, or the walk stopped before the bottom (exit 1)."""
        return self.error is not None or any(ld.error is not None for ld in self.layers)

    def layer_dict(self, ld: LayerDump) -> dict[str, Any]:
        layer = ld.layer
        return {
            "index": layer.index,
            "filename": layer.filename,
            "format": layer.format,
            "format_source": layer.format_source,
            "backing_file": layer.backing_name,
            "backing_file_format": layer.backing_format,
            "virtual_size": layer.virtual_size,
            "error": ld.error,
        }


def _gathered(source: ExtentSource) -> Extents:
    """All the extents a layer's source streams, as one pair of arrays."""
    blocks = list(source())
    if not blocks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def union_extents(parts: Sequence[Extents], limit: int) -> Extents:
    """The union of several sorted extent lists, merged and cut at byte *limit*."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    starts = np.concatenate([p[0] for p in parts]).astype(np.int64)
    ends = starts + np.concatenate([p[1] for p in parts]).astype(np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], np.minimum(ends[order], limit)
    keep = starts < ends
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return starts, ends - starts
    # A range starts a new run when it begins after every earlier range ended.
    reach = np.maximum.accumulate(ends)
    new_run = np.ones(len(starts), dtype=bool)
    new_run[1:] = starts[1:] > reach[:-1]
    run_starts = starts[new_run]
    last_index = np.append(np.flatnonzero(new_run)[1:] - 1, len(starts) - 1)
    run_ends = reach[last_index]
    return run_starts, run_ends - run_starts


def chain_dump_report(
    chain: BackingChain, *, names: Sequence[str] = (), with_extents: bool = False
) -> ChainDumpReport:
    """Dump every layer of *chain*; with *with_extents*, each selected name's union.

    *names* selects bitmaps (all when empty); a name no layer has raises
    UsageError.  A layer that cannot be dumped is kept with its error.
    """
    layers: list[LayerDump] = []
    top_size = chain.layers[0].virtual_size or 0
    wanted = set(names)
    for layer in chain.layers:
        image = chain.images.get(layer.index)
        if image is None:
            layers.append(LayerDump(layer, None))
            continue
        try:
            here: list[str] = []
            if names:
                entries = image.read_directory().entries
                here = [n for n in dict.fromkeys(names) if any(e.named(n) for e in entries)]
            report = dump_report(
                image,
                filename=layer.filename,
                names=here,
                with_extents=with_extents and (bool(here) or not names),
            )
        except QbitmapError as exc:
            layers.append(LayerDump(layer, None, f"{layer.filename}: {exc}"))
            continue
        if names and not here:
            # None of the names is in this layer: show the layer, none of its bitmaps.
            shown = {b["name"] for b in report.info["bitmaps"]}
            report.warnings = [w for w in report.warnings if not any(repr(n) in w for n in shown)]
            report.info["bitmaps"], report.extents = [], []
        layers.append(LayerDump(layer, report))
    found: dict[str, list[int]] = {}
    for ld in layers:
        for name in ld.names():
            found.setdefault(name, []).append(ld.layer.index)
    if names:
        missing = [n for n in names if n not in found]
        if missing and not any(ld.error for ld in layers):
            raise UsageError(
                f"{chain.layers[0].filename}: no bitmap named {missing[0]!r} in any layer "
                "of the backing chain"
            )
        selected = [n for n in dict.fromkeys(names) if n in wanted and n in found]
    else:
        selected = list(found)
    out = ChainDumpReport(chain.layers[0].filename, layers, chain.error)
    for ld in layers:
        if ld.report is not None:
            out.warnings.extend(
                f"layer {ld.layer.index} ({ld.layer.filename}): {w}" for w in ld.report.warnings
            )
    for name in selected:
        bitmap = ChainBitmap(name, tuple(found[name]))
        if with_extents:
            parts = []
            for ld in layers:
                if ld.report is None:
                    continue
                for bm, source in zip(ld.report.info["bitmaps"], ld.report.extents, strict=True):
                    if bm["name"] == name and source is not None:
                        parts.append(_gathered(source))
            bitmap.extents = union_extents(parts, top_size)
            bitmap.dirty_bytes = int(bitmap.extents[1].sum())
        out.bitmaps.append(bitmap)
    return out


__all__ = ["ChainBitmap", "ChainDumpReport", "LayerDump", "chain_dump_report", "union_extents"]
