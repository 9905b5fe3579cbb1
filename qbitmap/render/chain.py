"""Rendering of ``dump --backing-chain`` and ``check --backing-chain``.

JSON and lines never import rich; the rich views build every name taken
from an image or a file name as ``Text`` with control characters escaped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from qbitmap.render import iec, section_table
from qbitmap.render.check import printable

if TYPE_CHECKING:
    import numpy as np
    from rich.console import RenderableType
    from rich.table import Table

    from qbitmap.check.chain import ChainCheckReport
    from qbitmap.inspect_chain import ChainDumpReport

BLOCK = 16384
_VERDICT_STYLE = {
    "ok": "green",
    "in-use": "bold yellow",
    "missing": "bold yellow",
    "gap": "bold yellow",
    "not-recording": "bold yellow",
    "corrupt": "bold red",
    "unreadable": "bold red",
}


def _extent_blocks(starts: np.ndarray, lengths: np.ndarray) -> Iterator[bytes]:
    item = b'{"start": %d, "length": %d}'
    for pos in range(0, len(starts), BLOCK):
        s = starts[pos : pos + BLOCK].tolist()
        n = lengths[pos : pos + BLOCK].tolist()
        flat: list[int] = [0] * (2 * len(s))
        flat[0::2], flat[1::2] = s, n
        yield b", ".join([item] * len(s)) % tuple(flat)


def write_dump_json(out: IO[bytes], report: ChainDumpReport) -> None:
    """One JSON object on one line: the chain, each layer's dump, each name's union."""
    from qbitmap.render.dump import write_json as write_layer

    out.write(b'{"filename": ' + json.dumps(report.filename).encode() + b', "backing_chain": [')
    for i, ld in enumerate(report.layers):
        if i:
            out.write(b", ")
        head = report.layer_dict(ld)
        if ld.report is None:
            head["dump"] = None
            out.write(json.dumps(head).encode())
            continue
        out.write(json.dumps(head)[:-1].encode() + b', "dump": ')
        buf = io.BytesIO()
        write_layer(buf, ld.report)
        out.write(buf.getvalue().rstrip(b"\n"))
        out.write(b"}")
    error = report.error
    out.write(b'], "chain_error": ')
    out.write(
        json.dumps(
            None if error is None else {"kind": error.kind, "message": error.message}
        ).encode()
    )
    out.write(b', "chain_bitmaps": [')
    for i, bm in enumerate(report.bitmaps):
        if i:
            out.write(b", ")
        body = json.dumps(bm.to_dict())
        if bm.extents is None:
            out.write(body.encode())
            continue
        out.write(body[:-1].encode() + b', "extents": [')
        first = True
        for block in _extent_blocks(*bm.extents):
            if not first:
                out.write(b", ")
            first = False
            out.write(block)
        out.write(b"]}")
    out.write(b"]}\n")


def write_dump_lines(out: IO[bytes], report: ChainDumpReport) -> None:
    """``START LENGTH`` per range of each name's union; a third column with several names."""
    from qbitmap.render.dump import line_name

    shown = [bm for bm in report.bitmaps if bm.extents is not None]
    for bm in shown:
        assert bm.extents is not None
        if len(shown) > 1:
            line = b"%d %d " + line_name(bm.name).replace("%", "%%").encode("ascii") + b"\n"
        else:
            line = b"%d %d\n"
        starts, lengths = bm.extents
        for pos in range(0, len(starts), BLOCK):
            s = starts[pos : pos + BLOCK].tolist()
            n = lengths[pos : pos + BLOCK].tolist()
            flat: list[int] = [0] * (2 * len(s))
            flat[0::2], flat[1::2] = s, n
            out.write((line * len(s)) % tuple(flat))


# -- rich -----------------------------------------------------------------------------------


def _chain_table(rows: list[tuple[int, str, str, str | None, str]]) -> Table:
    from rich.text import Text

    table = section_table("Backing chain", pad_edge=False)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("format", no_wrap=True)
    table.add_column("backing file (as written)", overflow="fold")
    table.add_column("bitmaps", overflow="fold")
    for index, filename, fmt, backing, bitmaps in rows:
        table.add_row(
            str(index),
            Text(printable(filename)),
            fmt,
            Text("-" if backing is None else printable(backing)),
            Text(bitmaps),
        )
    return table


def _error_text(message: str) -> RenderableType:
    from rich.text import Text

    return Text.assemble(("error: ", "bold red"), printable(message))


def dump_human(report: ChainDumpReport) -> RenderableType:
    """The chain, each qcow2 layer's bitmaps, and each name over the chain."""
    from rich.console import Group
    from rich.text import Text

    from qbitmap.render.dump import bitmaps_table

    rows = []
    for ld in report.layers:
        names = ", ".join(
            printable(b["name"]) + (" (" + ", ".join(b["flags"]) + ")" if b["flags"] else "")
            for b in ([] if ld.report is None else ld.report.info["bitmaps"])
        )
        if ld.report is None:
            names = ld.error or ("no bitmaps (raw)" if ld.layer.format == "raw" else "-")
        rows.append(
            (
                ld.layer.index,
                ld.layer.filename,
                ld.layer.format,
                ld.layer.backing_name,
                names or "-",
            )
        )
    parts: list[RenderableType] = [_chain_table(rows)]
    if report.error is not None:
        parts.append(_error_text(report.error.message))
    for ld in report.layers:
        if ld.report is None or not ld.report.info["bitmaps"]:
            continue
        parts.append(Text(f"Layer {ld.layer.index}: {printable(ld.layer.filename)}", style="bold"))
        parts.append(bitmaps_table(ld.report.info["bitmaps"]))
    if report.bitmaps:
        table = section_table("Bitmaps over the chain", pad_edge=False)
        table.add_column("name", overflow="fold")
        table.add_column("in layers", no_wrap=True)
        table.add_column("dirty (union)", justify="right", no_wrap=True)
        for bm in report.bitmaps:
            table.add_row(
                Text(printable(bm.name)),
                ", ".join(map(str, bm.present_in)),
                "-" if bm.dirty_bytes is None else iec(bm.dirty_bytes),
            )
        parts.append(table)
    return Group(*parts)


def write_dump_human(ui: Any, report: ChainDumpReport) -> None:
    """Print the chain dump through *ui* (a qbitmap.ui.Ui), then each name's union extents."""
    from rich.text import Text

    from qbitmap.render.dump import extent_stats, extent_text

    ui.print(dump_human(report))
    for bm in report.bitmaps:
        if bm.extents is None:
            continue
        count = len(bm.extents[0])
        ui.print(
            Text.assemble(
                ("Dirty extents of ", "bold"),
                (repr(printable(bm.name)), "bold"),
                f" over layers {', '.join(map(str, bm.present_in))} "
                f"({count} range{'' if count == 1 else 's'})",
            )
        )
        blocks = [bm.extents] if count else []
        for block in extent_text(blocks, extent_stats(blocks)):
            ui.write(block)


_CHECK_RESULT = {
    0: "every layer consistent",
    1: "could not check every layer",
    2: "corruption found",
    3: "leaked clusters only",
    4: "in-use bitmaps (metadata sound)",
    75: "an image is held by a running writer",
}


def check_human(report: ChainCheckReport) -> RenderableType:
    """Each layer's check, then libvirt's rule per bitmap name, then the result."""
    from rich.console import Group
    from rich.text import Text

    from qbitmap.render.check import human as layer_human

    rows = []
    for view in report.views:
        names = ", ".join(printable(n) for n in view.names())
        if view.report is None:
            names = "no bitmaps (raw)" if view.layer.format == "raw" else "-"
        rows.append(
            (view.index, view.filename, view.layer.format, view.layer.backing_name, names or "-")
        )
    parts: list[RenderableType] = [_chain_table(rows)]
    if report.error is not None:
        parts.append(_error_text(report.error.message))
    for view in report.views:
        if view.report is None:
            continue
        parts.append(Text(f"Layer {view.index}", style="bold underline"))
        parts.append(layer_human(view.report))
    if report.verdicts:
        table = section_table("libvirt's rule for a checkpoint bitmap, per name", pad_edge=False)
        table.add_column("name", overflow="fold")
        table.add_column("verdict", no_wrap=True)
        table.add_column("in layers", no_wrap=True)
        table.add_column("why", overflow="fold")
        for v in report.verdicts:
            table.add_row(
                Text(printable(v.name)),
                Text(v.verdict, style=_VERDICT_STYLE.get(v.verdict, "")),
                ", ".join(map(str, v.present_in)) or "-",
                Text(printable(v.reason)),
            )
        parts.append(table)
    code = report.exit_code
    style = "green" if code == 0 else ("yellow" if code in (3, 4) else "bold red")
    parts.append(
        Text(f"Result over the chain: {_CHECK_RESULT.get(code, '?')} (exit {code})", style=style)
    )
    return Group(*parts)


def write_check_json(out: IO[str], report: ChainCheckReport) -> None:
    """One JSON object and a newline."""
    out.write(json.dumps(report.to_dict()) + "\n")
