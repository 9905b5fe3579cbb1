"""recover's table for people: a dry run says what would happen, never what happened.

A real run on the same image then says it in the past tense; the JSON keeps
its keys and values either way (``dry_run`` tells them apart).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import corrupt
import pytest
import qemu

MiB = 1 << 20
PAST = re.compile(r"(?<!would be )\b(freed|recovered|dropped|reclaimed|written|wrote)\b")


def recover(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", "recover", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def crashed_with_a_leak(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """b0 in use after a SIGKILLed writer, and one leaked cluster."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = qemu.create_image(tmp_path / "disk.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 65536)])
    qemu.crash_image(path, [(MiB, 4096)], bitmaps=("b0",))
    corrupt.EDITS["leaked-cluster"](corrupt.layout(path))
    return path


def test_a_dry_run_speaks_of_what_would_happen(crashed_with_a_leak: Path) -> None:
    before = crashed_with_a_leak.read_bytes()
    dry = recover("--dry-run", "--mode", "full", crashed_with_a_leak)
    assert dry.returncode == 0, dry.stderr
    headline, *rest = dry.stdout.splitlines()
    assert headline.endswith("dry run: nothing was written")
    # Above the plan (whose steps describe the writes to make); the plan itself is shown.
    body, plan = "\n".join(rest).split("Writes, in order")
    assert PAST.findall(body) == [], body
    assert "free" in plan and "header" in plan
    assert "would recover" in body and "leaked clusters that would be freed: 1" in body
    assert crashed_with_a_leak.read_bytes() == before
    report = json.loads(
        recover("--dry-run", "--json", "--mode", "full", crashed_with_a_leak).stdout
    )
    assert report["dry_run"] is True and report["bitmaps"][0]["action"] == "recovered"

    real = recover("--mode", "full", crashed_with_a_leak)
    assert real.returncode == 0, real.stderr
    assert "would" not in real.stdout
    assert "recovered" in real.stdout and "leaked clusters freed: 1" in real.stdout
