"""Rendering of ``qbitmap recover``: a summary table and the write plan, or JSON."""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING, Any

from qbitmap.render import hexoff, iec, keep_whole, printable, section_table

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from qbitmap.recover import RecoverReport

# rich is imported inside the functions that build renderables: ``--json`` never needs it.

_HEADLINE = {
    "recovered": "recovered",
    "nothing-to-do": "nothing to do",
    "leaks-reclaimed": "no bitmap to recover; leaked clusters freed",
    "dry-run": "dry run: nothing was written",
}


#: ``status`` of a run that produced no report, by exit status.
FAILURE_STATUS = {1: "failed", 2: "refused", 64: "usage-error", 75: "busy", 130: "interrupted"}


def to_json(report: RecoverReport, error: str | None = None) -> dict[str, Any]:
    """The report's own keys, plus ``error``: why the run failed, or null."""
    return {**report.to_dict(), "error": error}


def write_json(stream: IO[str], report: RecoverReport) -> None:
    _dump(stream, to_json(report))


def write_failure_json(
    stream: IO[str], filename: str | None, dry_run: bool, exit_code: int, error: str
) -> None:
    """The JSON object of a run that stopped without a report (refused, busy, failed, ...).

    Every key of a report is there; ``status`` says why (:data:`FAILURE_STATUS`),
    and ``error`` is the line printed on stderr.
    """
    from qbitmap.recover import RecoverReport

    report = RecoverReport(
        filename=filename,  # type: ignore[arg-type]
        dry_run=dry_run,
        status=FAILURE_STATUS.get(exit_code, "failed"),
        exit_code=exit_code,
    )
    _dump(stream, to_json(report, error))


def _dump(stream: IO[str], document: dict[str, Any]) -> None:
    json.dump(document, stream, indent=2)
    stream.write("\n")


def _size(value: int | None) -> str:
    return "-" if value is None else iec(value)


# A dry run wrote nothing: its table says what a real run would do.
_DRY_RUN_ACTION = {"recovered": "would recover", "dropped": "would drop", "renamed": "would rename"}


def bitmaps_table(report: RecoverReport) -> Table:
    from rich.text import Text

    table = section_table("Bitmaps")
    table.add_column("bitmap", min_width=8, no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("mode", no_wrap=True)
    table.add_column("dirty before", justify="right", no_wrap=True)
    table.add_column("dirty after", justify="right", no_wrap=True)
    table.add_column("new table", justify="right", no_wrap=True)
    table.add_column("note")
    for b in report.bitmaps:
        note = b.reason or ""
        if b.mode == "level" and b.consistent_level is not None:
            note = f"consistent_level {b.consistent_level}"
        table.add_row(
            Text(printable(b.name)),
            _DRY_RUN_ACTION.get(b.action, b.action) if report.dry_run else b.action,
            b.mode or "-",
            _size(b.dirty_bytes_before),
            _size(b.dirty_bytes_after),
            hexoff(b.new_table_offset) if b.new_table_offset else "-",
            Text(printable(note)),
        )
    return keep_whole(table)


def steps_table(steps: list[dict[str, Any]]) -> Table:
    from rich.text import Text

    table = section_table("Writes, in order")
    table.add_column("phase")
    table.add_column("action")
    table.add_column("offset", justify="right")
    table.add_column("length", justify="right")
    table.add_column("what")
    for s in steps:
        table.add_row(
            s["phase"],
            s["action"],
            hexoff(s["offset"]),
            "-" if s["length"] is None else str(s["length"]),
            Text(printable(s["what"])),
        )
    return table


def human(report: RecoverReport) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [
        Text(printable(f"{report.filename}: {_HEADLINE.get(report.status, report.status)}"))
    ]
    if report.bitmaps:
        parts.append(bitmaps_table(report))
    if report.reference:
        r = report.reference
        parts.append(
            Text(
                printable(
                    f"reference {r['path']}: compared {iec(r['compared_bytes'])}, skipped "
                    f"{iec(r['skipped_bytes'])} by allocation maps, "
                    f"{r['differing_granules']} granules differ"
                )
            )
        )
    if report.leaked_clusters_reclaimed:
        freed = "that would be freed" if report.dry_run else "freed"
        parts.append(Text(f"leaked clusters {freed}: {report.leaked_clusters_reclaimed}"))
    if report.dry_run and report.steps:
        parts.append(steps_table(report.steps))
    return Group(*parts)
