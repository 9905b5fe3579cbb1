"""Helpers of the ``qbitmap dump`` tests: run the CLI in-process or as a real process.

A plain module (not a conftest): test modules import it by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from qbitmap.cli import cli


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def extents(self, name: str) -> list[tuple[int, int]]:
        """The ``extents`` of bitmap *name* in a ``--json --extents`` result."""
        (bitmap,) = [b for b in self.json["bitmaps"] if b["name"] == name]
        return [(e["start"], e["length"]) for e in bitmap["extents"]]


def dump(*args: str | Path) -> Result:
    """``qbitmap dump ARGS`` in-process (click's CliRunner, exceptions not caught)."""
    result = CliRunner().invoke(cli, ["dump", *map(str, args)], catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def dump_process(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """``python -m qbitmap dump ARGS`` as a real process, stdout/stderr being pipes."""
    proc = subprocess.run(
        [sys.executable, "-m", "qbitmap", "dump", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
