"""The code keeps its lint rules and its format (ruff, pinned in pyproject.toml).

Both run over every Python file of the repository: the package, the tests,
the benchmarks, the scripts and the examples.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PATHS = ["qbitmap", "tests", "bench", "scripts", "examples"]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [("check", "--output-format", "concise"), ("format", "--check")],
    ids=["lint", "format"],
)
def test_ruff(args):
    proc = _ruff(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
