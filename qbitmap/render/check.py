"""Rendering of ``qbitmap check``: a rich view for people, one JSON object for scripts.

Everything taken from the image (bitmap names, messages quoting them) goes
through :func:`qbitmap.render.printable` into ``Text`` objects, never through
markup, so a bitmap named ``[red]`` is printed as those characters and one
holding an escape sequence as ``\x1b...``.
"""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING, Any

from qbitmap.check import BitmapStatus, CheckReport, Severity
from qbitmap.render import hexoff, iec, keep_whole, printable, section_table

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import Text

# rich is imported inside the functions that build renderables: ``--json`` never needs it.

_SEVERITY_STYLE = {
    Severity.INFO: "cyan",
    Severity.LEAK: "yellow",
    Severity.IN_USE: "bold yellow",
    Severity.CORRUPT: "bold red",
    Severity.FAILED: "bold red",
}
_STATUS_STYLE = {"consistent": "green", "in-use": "bold yellow", "corrupt": "bold red"}


_VERDICT = {
    0: "all bitmaps consistent",
    1: "could not check the image",
    2: "corruption found",
    3: "leaked clusters only",
    4: "in-use bitmaps (metadata sound)",
    75: "the image is held by a running writer (its bitmaps live in its memory)",
}


def verdict(exit_code: int) -> str:
    """check's verdict for *exit_code*, in words (the ``Result:`` line's)."""
    return _VERDICT.get(exit_code, f"exit status {exit_code}")


def _result_style(code: int) -> str:
    return "green" if code == 0 else ("yellow" if code in (3, 4, 75) else "bold red")


def failure_human(filename: str, exit_code: int) -> RenderableType:
    """What stands for an image of several that made no report (its error is on stderr)."""
    from rich.console import Group
    from rich.text import Text

    return Group(
        Text(f"Image: {printable(filename)}"),
        Text(f"Result: {verdict(exit_code)} (exit {exit_code})", style=_result_style(exit_code)),
    )


def several_human(outcomes: list[tuple[str, int]]) -> RenderableType:
    """The closing lines after several images: how many had each verdict, and which."""
    from rich.console import Group
    from rich.text import Text

    from qbitmap.check.chain import EXIT_PRECEDENCE, worst_exit_code

    by_code: dict[int, list[str]] = {}
    for filename, code in outcomes:
        by_code.setdefault(code, []).append(filename)
    lines: list[RenderableType] = [Text(f"Over {len(outcomes)} images:", style="bold")]
    order = [int(c) for c in EXIT_PRECEDENCE]
    # Worst first, by check's precedence; the sound ones last.
    for code in sorted(by_code, key=lambda c: (c == 0, order.index(c) if c in order else c)):
        files = by_code[code]
        line = Text(f"  {len(files)} {verdict(code)} (exit {code})", style=_result_style(code))
        if code != 0:
            line.append(": " + ", ".join(printable(f) for f in files))
        lines.append(line)
    code = worst_exit_code(c for _, c in outcomes)
    lines.append(Text(f"Result: exit {code}", style=_result_style(code)))
    return Group(*lines)


def findings_block(report: CheckReport) -> RenderableType:
    """Each finding as a line of facts, then its message on its own indented line."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    lines: list[RenderableType] = [Text("Findings", style="bold")]
    for f in report.findings:
        head = Text("  ")
        head.append(f"{f.severity.label:<8}", style=_SEVERITY_STYLE[f.severity])
        head.append(" ")
        head.append(f.code, style="bold")
        if f.bitmap is not None:
            head.append("  bitmap ")
            head.append(repr(f.bitmap))
        if f.offset is not None:
            head.append(f"  at {hexoff(f.offset)}")
            if f.field:
                head.append(f" ({f.field})")
        lines.append(head)
        lines.append(Padding(Text(printable(f.message), overflow="fold"), (0, 0, 0, 4)))
    return Group(*lines)


def _levels_text(b: BitmapStatus) -> Text:
    from rich.text import Text

    a = b.levels
    if a is None:
        return Text("-")
    if a.status == "absent":
        return Text("no record")
    parts = [f"{a.status}: level {a.consistent_level} of {a.max_level}, level_bits {a.level_bits}"]
    rec = b.recovery
    if rec is not None and rec.granularity is not None:
        parts.append(f"recovery granularity {iec(rec.granularity)}")
    if rec is not None and rec.dirty_bytes is not None:
        parts.append(f"level recovery marks {iec(rec.dirty_bytes)} dirty")
    return Text("; ".join(parts))


def bitmaps_table(report: CheckReport) -> Table:
    from rich.text import Text

    table = section_table("Bitmaps")
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("granularity", justify="right", no_wrap=True)
    table.add_column("consistency levels", overflow="fold")
    for b in report.bitmaps:
        gran = "-"
        if b.entry is not None and 0 <= b.entry.granularity_bits <= 63:
            gran = iec(b.entry.granularity)
        table.add_row(
            Text(printable(b.name)),
            Text(b.status, style=_STATUS_STYLE.get(b.status, "")),
            gran,
            _levels_text(b),
        )
    return keep_whole(table)


def human(report: CheckReport) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [Text(f"Image: {printable(report.filename)}")]
    if report.bitmaps:
        parts.append(bitmaps_table(report))
    elif report.exit_code != 1:
        parts.append(Text("No bitmaps."))
    if report.findings:
        parts.append(findings_block(report))
    code = report.exit_code
    parts.append(Text(f"Result: {verdict(code)} (exit {code})", style=_result_style(code)))
    return Group(*parts)


def error_line(report: CheckReport) -> str | None:
    """Why the image could not be checked (exit 1), naming the file; None for any other verdict."""
    failed = [f for f in report.findings if f.severity is Severity.FAILED]
    if report.exit_code != 1 or not failed:
        return None
    message = failed[0].message
    return message if report.filename in message else f"{report.filename}: {message}"


def to_json(report: CheckReport) -> dict[str, Any]:
    """The report's own keys, plus ``error``: :func:`error_line`, or null."""
    out = report.to_dict()
    out["error"] = error_line(report)
    return out


def write_json(out: IO[str], report: CheckReport) -> None:
    """One JSON object and a newline."""
    out.write(json.dumps(to_json(report)) + "\n")


def write_failure_json(out: IO[str], filename: str | None, exit_code: int, error: str) -> None:
    """The JSON object of a run that produced no report (usage error, interrupt, failure).

    Every key of a report is there (no findings, no bitmaps), so a script
    reads ``exit_code`` and ``error`` the same way whatever happened.
    """
    document = to_json(CheckReport(filename=filename))  # type: ignore[arg-type]
    document.update(exit_code=exit_code, error=error)
    out.write(json.dumps(document) + "\n")
