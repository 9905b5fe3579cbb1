"""Rendering of ``qbitmap dump``: rich tables for people, JSON and lines for scripts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import IO, Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qbitmap.render import hexoff, iec


def _kv_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    return table


def header_table(info: dict[str, Any]) -> Table:
    header = info["header"]
    table = _kv_table("Header")
    table.add_row("file", Text(info["filename"]))
    table.add_row("version", str(header["version"]))
    table.add_row("virtual size", f"{iec(info['virtual_size'])} ({info['virtual_size']} bytes)")
    table.add_row("cluster size", f"{iec(info['cluster_size'])} (cluster_bits {header['cluster_bits']})")
    if header["version"] >= 3:
        table.add_row("header length", str(header["header_length"]))
        table.add_row("refcount bits", str(1 << header["refcount_order"]))
        compression = {0: "zlib", 1: "zstd"}.get(header["compression_type"] or 0, "unknown")
        table.add_row("compression", compression)
    for kind in ("incompatible", "compatible", "autoclear"):
        words = info["features"].get(kind, [])
        raw = header.get(f"{kind}_features")
        label = f"{kind} features"
        if raw is None:
            continue
        table.add_row(label, Text(f"{raw:#x}" + (f": {', '.join(words)}" if words else "")))
    table.add_row("L1 table", f"{hexoff(header['l1_table_offset'])}, {header['l1_size']} entries")
    table.add_row(
        "refcount table",
        f"{hexoff(header['refcount_table_offset'])}, {header['refcount_table_clusters']} clusters",
    )
    table.add_row("snapshots", f"{header['nb_snapshots']} at {hexoff(header['snapshots_offset'])}")
    if header["backing_file_offset"]:
        table.add_row("backing file", Text(info.get("backing_file", "")))
    return table


def extensions_table(extensions: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="Header extensions", title_justify="left", box=box.SIMPLE_HEAD)
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
            Text(_extension_summary(ext)),
        )
    return table


def _extension_summary(ext: dict[str, Any]) -> str:
    if "value" in ext:
        return repr(ext["value"])
    if "features" in ext:
        return f"{len(ext['features'])} feature names"
    if "nb_bitmaps" in ext:
        return (
            f"{ext['nb_bitmaps']} bitmaps, directory {ext['bitmap_directory_size']} bytes "
            f"at {hexoff(ext['bitmap_directory_offset'])}"
        )
    if "crypto_header_offset" in ext:
        return f"encryption header {ext['crypto_header_length']} bytes at {hexoff(ext['crypto_header_offset'])}"
    if "records" in ext:
        parts = [
            f"{r['name']!r}: level {r['consistent_level']}/{r['max_level']} (level_bits {r['level_bits']})"
            for r in ext["records"]
        ]
        return "; ".join(parts) or "no records"
    data = ext.get("data", "")
    return data[:48] + ("..." if len(data) > 48 else "")


def bitmaps_table(bitmaps: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="Bitmaps", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("name")
    table.add_column("granularity", justify="right", no_wrap=True)
    table.add_column("flags", no_wrap=True)
    table.add_column("type", justify="right")
    table.add_column("table", justify="right", no_wrap=True)
    table.add_column("dirty", justify="right", no_wrap=True)
    for bm in bitmaps:
        flags = Text(", ".join(bm["flags"]) or "-")
        if bm["in_use"]:
            flags.stylize("bold yellow")
        if bm["flags_raw"] & ~3:
            flags.append(f" (raw {bm['flags_raw']:#x})", style="red")
        dirty = bm.get("dirty_bytes")
        dirty_text = Text("?" if dirty is None else f"{iec(dirty)}")
        if bm["in_use"]:
            dirty_text.append(" stale", style="yellow")
        table.add_row(
            Text(bm["name"]),
            iec(bm["granularity"]),
            flags,
            str(bm["type"]),
            f"{bm['table_size']} @ {hexoff(bm['table_offset'])}",
            dirty_text,
        )
    return table


def extents_table(name: str, runs: Iterable[tuple[int, int]]) -> Table:
    table = Table(title=Text(f"Dirty extents of {name!r}"), title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("start", justify="right", no_wrap=True)
    table.add_column("length", justify="right", no_wrap=True)
    table.add_column("end", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for start, length in runs:
        table.add_row(str(start), str(length), str(start + length), iec(length))
    return table


def stale_warning(name: str) -> Text:
    return Text.assemble(
        ("warning: ", "bold yellow"),
        f"bitmap {name!r} is in use: a writer did not close it cleanly. The contents shown are "
        "what is on disk and are stale; writes made since the last clean close are missing. "
        "See 'qbitmap check' and 'qbitmap recover'.",
    )


def human(info: dict[str, Any], extents: dict[str, list[tuple[int, int]]]) -> RenderableType:
    parts: list[RenderableType] = [header_table(info), extensions_table(info["extensions"])]
    if info["bitmaps"]:
        parts.append(bitmaps_table(info["bitmaps"]))
    else:
        parts.append(Text("No bitmaps."))
    for bm in info["bitmaps"]:
        if bm["in_use"]:
            parts.append(stale_warning(bm["name"]))
    for bm in info["bitmaps"]:
        if bm["name"] in extents:
            parts.append(extents_table(bm["name"], extents[bm["name"]]))
    return Group(*parts)


def write_json(out: IO[str], info: dict[str, Any], extents: dict[str, list[tuple[int, int]]] | None) -> None:
    """Write the dump as one JSON object.  Extents are streamed (they can be many)."""
    top = {k: v for k, v in info.items() if k != "bitmaps"}
    head = json.dumps(top, indent=None)
    out.write(head[:-1])
    out.write(', "bitmaps": [')
    for i, bm in enumerate(info["bitmaps"]):
        if i:
            out.write(", ")
        body = json.dumps(bm)
        if extents is None:
            out.write(body)
            continue
        out.write(body[:-1])
        out.write(', "extents": [')
        runs = extents.get(bm["name"], [])
        out.write(", ".join([f'{{"start": {s}, "length": {n}}}' for s, n in runs]))
        out.write("]}")
    out.write("]}\n")


def write_lines(out: IO[str], extents: dict[str, list[tuple[int, int]]], *, with_names: bool) -> None:
    """``START LENGTH`` a line (``START LENGTH NAME`` when several bitmaps are shown)."""
    for name, runs in extents.items():
        if with_names:
            safe = name.encode("unicode_escape").decode("ascii")
            out.write("".join([f"{s} {n} {safe}\n" for s, n in runs]))
        else:
            out.write("".join([f"{s} {n}\n" for s, n in runs]))
