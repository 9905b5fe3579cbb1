"""Rendering of ``qbitmap dump``: rich tables for people, JSON and lines for scripts.

The machine forms (:func:`write_json`, :func:`write_lines`) never import
rich, and format extents a block at a time with one C-level ``%`` per block
(hundreds of thousands of extents per second).  Every form streams the
extents from the report's sources as the image yields them: memory is
bounded by a block, whatever the number of ranges.
The rich form builds every name from the image as ``Text``, never markup, and
passes it through :func:`qbitmap.render.printable` first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from qbitmap.format.model import COMPRESSION_TYPES
from qbitmap.render import hexoff, iec, keep_whole, printable, section_table

if TYPE_CHECKING:
    import numpy as np
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import Text

    from qbitmap.inspect import DumpReport

# Extents formatted per block: ~30 bytes of text each, so ~0.5 MiB at a time.
BLOCK = 16384


def _slices(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The extent blocks cut into slices of at most BLOCK extents."""
    for starts, lengths in blocks:
        for pos in range(0, len(starts), BLOCK):
            yield starts[pos : pos + BLOCK], lengths[pos : pos + BLOCK]


def _pairs(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
) -> Iterator[tuple[int, tuple[int, ...]]]:
    """Slices of ``(count, (start0, length0, start1, length1, ...))`` as Python ints."""
    import numpy as np

    for starts, lengths in _slices(blocks):
        # Interleaved by numpy, converted in one call: cheaper than two lists spliced.
        pairs = np.empty((len(starts), 2), dtype=starts.dtype)
        pairs[:, 0] = starts
        pairs[:, 1] = lengths
        yield len(starts), tuple(pairs.ravel().tolist())


class _Repeated:
    """``separator.join([pattern] * count)``, the full-slice one built once."""

    def __init__(self, pattern: bytes, separator: bytes = b"") -> None:
        self.pattern = pattern
        self.separator = separator
        self.full = separator.join([pattern] * BLOCK)

    def __call__(self, count: int) -> bytes:
        return self.full if count == BLOCK else self.separator.join([self.pattern] * count)


def _json_extents(out: IO[bytes], blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    items = _Repeated(b'{"start": %d, "length": %d}', b", ")
    first = True
    for count, flat in _pairs(blocks):
        if not first:
            out.write(b", ")
        first = False
        out.write(items(count) % flat)


def write_json(out: IO[bytes], report: DumpReport) -> None:
    """Write the dump as one JSON object on one line (UTF-8), extents streamed.

    *out* is a binary stream (``sys.stdout.buffer``): extents are formatted
    as bytes a block at a time, skipping a text layer for megabytes of digits.
    """
    info = report.info
    top = {k: v for k, v in info.items() if k != "bitmaps"}
    out.write(json.dumps(top)[:-1].encode())
    out.write(b', "bitmaps": [')
    for i, (bm, ext) in enumerate(zip(info["bitmaps"], report.extents, strict=True)):
        if i:
            out.write(b", ")
        body = json.dumps(bm).encode()
        if ext is None:
            out.write(body)
            continue
        out.write(body[:-1])
        out.write(b', "extents": [')
        _json_extents(out, ext())
        out.write(b"]}")
    out.write(b"]}\n")


def line_name(name: str) -> str:
    """A bitmap name made safe for one whitespace-separated column (no spaces, no newlines)."""
    return name.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def write_lines(out: IO[bytes], report: DumpReport) -> None:
    """``START LENGTH`` a line; ``START LENGTH NAME`` when several bitmaps are shown.

    *out* is a binary stream, as for :func:`write_json`.
    """
    shown = [
        (bm["name"], ext)
        for bm, ext in zip(report.info["bitmaps"], report.extents, strict=True)
        if ext is not None
    ]
    with_names = len(shown) > 1
    for name, source in shown:
        if with_names:
            line = b"%d %d " + line_name(name).replace("%", "%%").encode("ascii") + b"\n"
        else:
            line = b"%d %d\n"
        lines = _Repeated(line)
        for count, flat in _pairs(source()):
            out.write(lines(count) % flat)


# -- rich ---------------------------------------------------------------------------------


def _kv_table(title: str) -> Table:
    table = section_table(title, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    # One fact per row, file names among them: kept whole on their line.
    table.add_column("value", no_wrap=True)
    return table


def _count(n: int, word: str) -> str:
    if n == 1:
        return f"1 {word}"
    return f"{n} {word[:-1] + 'ies' if word.endswith('y') else word + 's'}"


def header_table(info: dict[str, Any]) -> Table:
    from rich.text import Text

    header = info["header"]
    table = _kv_table("Header")
    table.add_row("file", Text(printable(info["filename"])))
    table.add_row("version", str(header["version"]))
    table.add_row("virtual size", f"{iec(info['virtual_size'])} ({info['virtual_size']} bytes)")
    table.add_row(
        "cluster size", f"{iec(info['cluster_size'])} (cluster_bits {header['cluster_bits']})"
    )
    if header["version"] >= 3:
        table.add_row("header length", str(header["header_length"]))
        table.add_row("refcount bits", str(1 << min(header["refcount_order"], 64)))
        code = header["compression_type"] or 0
        table.add_row("compression", COMPRESSION_TYPES.get(code, f"unknown ({code})"))
        for kind in ("incompatible", "compatible", "autoclear"):
            words = info["features"].get(kind, [])
            raw = header[f"{kind}_features"]
            table.add_row(
                f"{kind} features",
                Text(printable(f"{raw:#x}" + (f": {', '.join(words)}" if words else ""))),
            )
    if header["crypt_method"]:
        method = {1: "AES (legacy)", 2: "LUKS"}.get(header["crypt_method"], "unknown")
        table.add_row("encryption", f"{method} (crypt_method {header['crypt_method']})")
    table.add_row(
        "L1 table", f"{_count(header['l1_size'], 'entry')} at {hexoff(header['l1_table_offset'])}"
    )
    table.add_row(
        "refcount table",
        f"{_count(header['refcount_table_clusters'], 'cluster')}"
        f" at {hexoff(header['refcount_table_offset'])}",
    )
    snapshots = header["nb_snapshots"]
    table.add_row(
        "internal snapshots",
        f"{snapshots} at {hexoff(header['snapshots_offset'])}" if snapshots else "none",
    )
    if "backing_file" in info:
        table.add_row("backing file", Text(printable(info["backing_file"])))
    return keep_whole(table)


def extensions_table(extensions: list[dict[str, Any]]) -> Table:
    from rich.text import Text

    table = section_table("Header extensions", pad_edge=False)
    table.add_column("offset", justify="right", no_wrap=True)
    table.add_column("magic", no_wrap=True)
    table.add_column("name")
    table.add_column("length", justify="right")
    table.add_column("contents")
    for ext in extensions:
        table.add_row(
            hexoff(ext["offset"]),
            ext["magic"],
            ext["name"],
            str(ext["length"]),
            Text(printable(_extension_summary(ext))),
        )
    return table


def _extension_summary(ext: dict[str, Any]) -> str:
    if "value" in ext:
        return repr(ext["value"])
    if "features" in ext:
        kinds = [f["type"] for f in ext["features"]]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
        return f"{len(kinds)} feature names ({counts})" if kinds else "empty"
    if "nb_bitmaps" in ext:
        return (
            f"{_count(ext['nb_bitmaps'], 'bitmap')}, directory of "
            f"{ext['bitmap_directory_size']} bytes "
            f"at {hexoff(ext['bitmap_directory_offset'])}"
        )
    if "crypto_header_offset" in ext:
        return (
            f"encryption header of {ext['crypto_header_length']} bytes "
            f"at {hexoff(ext['crypto_header_offset'])}"
        )
    if "records" in ext:
        parts = [
            f"{r['name']!r}: level {r['consistent_level']}/{r['max_level']}"
            f" (level_bits {r['level_bits']})"
            for r in ext["records"]
        ]
        return "; ".join(parts) or "no records"
    data = str(ext.get("data", ""))
    return data[:48] + ("..." if len(data) > 48 else "")


def bitmaps_table(bitmaps: list[dict[str, Any]]) -> Table:
    from rich.text import Text

    table = section_table("Bitmaps", pad_edge=False)
    table.add_column("name", min_width=8, no_wrap=True)
    table.add_column("granularity", justify="right", no_wrap=True)
    table.add_column("flags", no_wrap=True)
    table.add_column("type", justify="right", no_wrap=True)
    table.add_column("table", justify="right", no_wrap=True)
    table.add_column("dirty", justify="right", no_wrap=True)
    for bm in bitmaps:
        flags = Text(", ".join(bm["flags"]) or "-")
        if bm["in_use"]:
            flags.stylize("bold yellow")
        if bm["flags_raw"] & ~3:
            flags.append(f" ({bm['flags_raw']:#x})", style="red")
        dirty = Text(iec(bm["dirty_bytes"]))
        if bm["stale"]:
            dirty.append(" STALE", style="bold yellow")
        table.add_row(
            Text(printable(bm["name"])),
            iec(bm["granularity"]),
            flags,
            str(bm["type"]),
            f"{bm['table_size']} at {hexoff(bm['table_offset'])}",
            dirty,
        )
    return keep_whole(table)


def extents_title(name: str, count: int) -> Text:
    from rich.text import Text

    ranges = "range" if count == 1 else "ranges"
    return Text.assemble(
        ("Dirty extents of ", "bold"), (repr(name), "bold"), f" ({count} {ranges})"
    )


@dataclass(frozen=True)
class ExtentStats:
    """What the extent table's title and column widths need, gathered in a pass of its own."""

    count: int = 0
    last_start: int = 0
    last_end: int = 0
    max_length: int = 0


def extent_stats(blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> ExtentStats:
    count = last_start = last_end = max_length = 0
    for starts, lengths in blocks:
        count += len(starts)
        last_start = int(starts[-1])
        last_end = last_start + int(lengths[-1])
        max_length = max(max_length, int(lengths.max()))
    return ExtentStats(count, last_start, last_end, max_length)


def extent_text(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], stats: ExtentStats
) -> Iterator[str]:
    """The extents as an aligned plain-text table (start, length, end, size), in blocks.

    *stats* (from :func:`extent_stats` over the same extents) sizes the
    columns before the first row.  Plain text, not a rich Table: a bitmap
    can have millions of ranges, which rich would take minutes to lay out.
    Only numbers and units appear here, so there is nothing to escape.
    """
    if not stats.count:
        yield "  (clean: no dirty ranges)\n\n"
        return
    widths = (
        max(5, len(str(stats.last_start))),
        max(6, len(str(stats.max_length))),
        max(3, len(str(stats.last_end))),
        10,
    )
    head = "  ".join(
        f"{t:>{w}}" for t, w in zip(("start", "length", "end", "size"), widths, strict=True)
    )
    yield f"  {head}\n  {'-' * len(head)}\n"
    row = "  %{}d  %{}d  %{}d  %{}s\n".format(*widths)
    for starts, lengths in _slices(blocks):
        s = starts.tolist()
        n = lengths.tolist()
        e = (starts + lengths).tolist()
        sizes = list(map(iec, n))
        flat: list[object] = [0] * (4 * len(s))
        flat[0::4] = s
        flat[1::4] = n
        flat[2::4] = e
        flat[3::4] = sizes
        yield (row * len(s)) % tuple(flat)
    yield "\n"


def stale_warning(name: str, in_use: bool, writer_running: bool = False) -> Text:
    from rich.text import Text

    if in_use and writer_running:
        return Text.assemble(
            ("warning: ", "bold yellow"),
            f"bitmap {name!r} is in use: the image is held by a running writer, which keeps "
            "its bitmaps in its memory and stores them when it closes the image. The "
            "contents shown are what is on disk and are stale.",
        )
    why = (
        "is in use: a writer did not close it cleanly"
        if in_use
        else "belongs to an extension QEMU considers inconsistent"
    )
    return Text.assemble(
        ("warning: ", "bold yellow"),
        f"bitmap {name!r} {why}. The contents shown are what is on disk and are stale: "
        "writes made since the last clean close are missing. "
        "See 'qbitmap check' and 'qbitmap recover'.",
    )


def human(report: DumpReport) -> RenderableType:
    """Header, extensions, bitmaps and stale warnings as one rich renderable (no extents)."""
    from rich.console import Group
    from rich.text import Text

    info = report.info
    parts: list[RenderableType] = [header_table(info)]
    if info["extensions"]:
        parts.append(extensions_table(info["extensions"]))
    else:
        parts.append(Text("No header extensions.\n"))
    if info["bitmaps"]:
        parts.append(bitmaps_table(info["bitmaps"]))
    else:
        parts.append(Text("No bitmaps."))
    for bm in info["bitmaps"]:
        if bm["stale"]:
            parts.append(stale_warning(bm["name"], bm["in_use"], report.writer_running))
    return Group(*parts)


def map_group(report: DumpReport, width: int, shades: str) -> RenderableType:
    """Each bitmap's map (see :mod:`qbitmap.render.density`), *width* cells wide."""
    from rich.console import Group
    from rich.text import Text

    from qbitmap.render.density import cell_bounds, cell_dirty_bytes, map_lines

    size = report.info["virtual_size"]
    bounds = cell_bounds(size, width)
    parts: list[RenderableType] = []
    for bm, source in zip(report.info["bitmaps"], report.maps, strict=True):
        dirty = cell_dirty_bytes(bounds, source)
        parts.extend(map_lines(bm["name"], size, dirty, bounds, stale=bm["stale"], shades=shades))
        parts.append(Text(""))
    return Group(*parts)


def write_human(
    ui: Any, report: DumpReport, *, map_width: int | None = None, shades: str = ""
) -> None:
    """Print the dump for people through *ui* (a qbitmap.ui.Ui): tables, maps, then extents.

    With *map_width*, each bitmap's map is drawn that many cells wide in *shades*.
    """
    ui.print(human(report))
    if map_width is not None and report.info["bitmaps"]:
        ui.print(map_group(report, map_width, shades))
    for bm, source in zip(report.info["bitmaps"], report.extents, strict=True):
        if source is None:
            continue
        stats = extent_stats(source())
        ui.print(extents_title(bm["name"], stats.count))
        for text in extent_text(source(), stats):
            ui.write(text)
