"""Every example of docs/api.md runs, in order, and prints what the page shows; so does the
README's example of the API.

The page's ``sh`` blocks prepare the images with QEMU's own tools; each
``python`` block runs in a fresh interpreter in the same directory; a
``text`` block right after a ``python`` block is what it must print.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import qemu

ROOT = Path(__file__).resolve().parents[2]
API_DOC = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


@dataclass
class Example:
    kind: str  # "sh" or "python"
    code: str
    line: int
    output: str | None = None


def examples(text: str) -> list[Example]:
    found: list[Example] = []
    last_end = 0
    for match in FENCE.finditer(text):
        kind, body = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        between = text[last_end : match.start()]
        if kind == "text":
            assert found and found[-1].kind == "python" and not between.strip(), (
                f"docs/api.md line {line}: an output block follows no python block"
            )
            found[-1].output = body
        elif kind in ("sh", "python"):
            found.append(Example(kind, body, line))
        else:
            raise AssertionError(f"docs/api.md line {line}: a ```{kind} block runs nowhere")
        last_end = match.end()
    return found


def test_the_page_has_examples_with_their_output():
    found = examples(API_DOC.read_text())
    pythons = [e for e in found if e.kind == "python"]
    assert len(pythons) >= 7
    assert all(e.output is not None for e in pythons), "every python example shows its output"


def test_every_example_runs_and_prints_what_the_page_shows(tmp_path: Path):
    qemu.require_tools("qemu-img", "qemu-io")
    for example in examples(API_DOC.read_text()):
        where = f"docs/api.md line {example.line}"
        if example.kind == "sh":
            proc = subprocess.run(
                ["bash", "-c", "set -euo pipefail; ulimit -c 0\n" + example.code],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert proc.returncode == 0, f"{where}: {proc.stderr}"
            continue
        proc = subprocess.run(
            [sys.executable, "-c", example.code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"{where}:\n{proc.stderr}"
        assert proc.stdout == example.output, f"{where} printed:\n{proc.stdout}"
    # The README's example of the API runs in the same directory.
    readme = README.read_text()
    section = readme[readme.index("## Python API\n") :]
    section = section[: section.index("\n## ")]
    (example,) = [e for e in examples(section) if e.kind == "python"]
    proc = subprocess.run(
        [sys.executable, "-c", example.code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == "", f"README.md: {proc.stderr}"
