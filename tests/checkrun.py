"""Run ``qbitmap check`` in-process through click's CliRunner (a module with a unique name,
so test files can import it whatever other ``conftest`` modules are loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from qbitmap.cli import cli


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def codes(self) -> set[str]:
        return {f["code"] for f in self.json["findings"]}


def run_check(*args: str | Path) -> Run:
    """``qbitmap check ARGS`` in-process through click's CliRunner."""
    runner = CliRunner()
    result = runner.invoke(cli, ["check", *map(str, args)], catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)
