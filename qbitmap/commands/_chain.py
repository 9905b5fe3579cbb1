"""The ``--backing-chain`` forms of ``dump`` and ``check`` (called from their commands).

Each function does what its command body does for one image, for a whole
backing chain, and returns the exit status.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qbitmap.errors import ExitCode
from qbitmap.ui import Ui


def dump_chain(
    ui: Ui, image: Path, names: tuple[str, ...], extents: bool, as_json: bool, lines: bool
) -> int:
    """``dump --backing-chain``: 0, or 1 when a layer could not be read or followed."""
    from qbitmap.format.chain import open_chain
    from qbitmap.inspect_chain import chain_dump_report

    # The layers' extents stream from the open images: render before closing them.
    with open_chain(image) as chain:
        report = chain_dump_report(chain, names=names, with_extents=extents or lines)
        for warning in report.warnings:
            ui.warning(warning)
        if as_json:
            from qbitmap.render.chain import write_dump_json

            sys.stdout.flush()
            write_dump_json(sys.stdout.buffer, report)
            sys.stdout.buffer.flush()
        elif lines:
            from qbitmap.render.chain import write_dump_lines

            sys.stdout.flush()
            write_dump_lines(sys.stdout.buffer, report)
            sys.stdout.buffer.flush()
        else:
            from qbitmap.render.chain import write_dump_human

            write_dump_human(ui, report)
    failures = [ld.error for ld in report.layers if ld.error is not None]
    if report.error is not None:
        failures.append(report.error.message)
    for message in failures:
        ui.error(message)
    return int(ExitCode.FAILED) if failures else int(ExitCode.OK)


def check_chain(ui: Ui, image: Path, names: tuple[str, ...], as_json: bool) -> int:
    """``check --backing-chain``: the worst layer's status by check's precedence."""
    from qbitmap.check.chain import check_chain_path

    report = check_chain_path(str(image), names=names)
    if as_json:
        from qbitmap.render.chain import write_check_json

        write_check_json(sys.stdout, report)
    else:
        from qbitmap.render.chain import check_human

        ui.print(check_human(report))
    return report.exit_code
