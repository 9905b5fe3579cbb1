"""What a scripted (``--json``) run loads and how it ends: start-up cost is part of the contract.

``recover --json`` and ``check --json`` import no rich (nothing is rendered for a
person), no ``numpy.ma`` and no ``concurrent.futures``; through the console
entry point they end with a fast exit once everything is closed, and still
print the whole report and exit with the report's code.
"""

from __future__ import annotations

import json
import subprocess
import sys

from recover_helpers import assert_qemu_accepts, run_probe

PROBE = """
import json, sys
from qbitmap.cli import cli
try:
    cli(sys.argv[1:], prog_name="qbitmap", standalone_mode=False)
finally:
    sys.stdout.flush()
    unwanted = ("rich", "numpy.ma", "concurrent.futures")
    loaded = sorted(m for m in sys.modules if m in unwanted or m.startswith(
        tuple(u + "." for u in unwanted)))
    sys.stderr.write("LOADED " + json.dumps(loaded) + "\\n")
"""


def _probe(*args: object) -> tuple[dict, list[str]]:
    return run_probe(PROBE, "LOADED", *args)


def test_json_runs_load_no_rich(crashed):
    report, loaded = _probe("check", "--json", crashed.image)
    assert report["exit_code"] == 4
    assert loaded == []
    report, loaded = _probe("recover", "--json", "--reference", crashed.backup, crashed.image)
    assert report["status"] == "recovered"
    assert loaded == []


def test_console_entry_fast_exit_keeps_output_and_code(crashed):
    entry = [sys.executable, "-m", "qbitmap"]
    proc = subprocess.run(
        [*entry, "check", "--json", str(crashed.image)], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 4 and json.loads(proc.stdout)["exit_code"] == 4
    proc = subprocess.run(
        [*entry, "recover", "--json", "--reference", str(crashed.backup), str(crashed.image)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "recovered"
    assert_qemu_accepts(crashed.image)
    proc = subprocess.run(
        [*entry, "check", str(crashed.image)], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.rstrip().endswith("Result: all bitmaps consistent (exit 0)")
