"""Every man page lints clean with mandoc and renders with man and groff without a warning.

The per-page tests (tests/test_cli.py, tests/check, tests/recover,
tests/levels) keep each page's content in step with the code; this one
holds all of them to the formatters, and fails (never skips) in CI when a
formatter is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import qemu

MAN_DIR = Path(__file__).resolve().parents[1] / "man"
PAGES = sorted(MAN_DIR.glob("*.[1-8]"))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"}
    env.pop("MAN_KEEP_FORMATTING", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_the_pages_are_all_here() -> None:
    assert [p.name for p in PAGES] == [
        "qbitmap-check.1",
        "qbitmap-checkpoints.1",
        "qbitmap-levels.5",
        "qbitmap-recover.1",
        "qbitmap.1",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_reports_nothing(page: Path) -> None:
    """Every level, style included: a long line or an unparsable date is reported too."""
    qemu.require_tools("mandoc")
    proc = run("mandoc", "-Tlint", str(page))
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_groff_and_man_render_without_warnings(page: Path) -> None:
    qemu.require_tools("groff", "man")
    proc = run("groff", "-man", "-t", "-ww", "-z", "-Tutf8", str(page))
    assert (proc.returncode, proc.stderr) == (0, "")
    proc = run("man", "-l", str(page))
    assert (proc.returncode, proc.stderr) == (0, "")
    text = re.sub(r".\x08", "", proc.stdout)
    title = re.search(r"^\.TH (\S+) (\d)", page.read_text(), re.MULTILINE)
    assert title is not None
    assert f"{title.group(1).replace(chr(92) + '-', '-')}({title.group(2)})" in text
    assert "NAME" in text
