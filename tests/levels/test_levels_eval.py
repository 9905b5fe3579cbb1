"""bench/levels_eval.py runs end to end (small), and its safety checks hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import qemu

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "levels_eval.py"


def test_levels_eval_smoke(tmp_path):
    qemu.require_tools("qemu-img")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--writes",
            "300",
            "--points",
            "4",
            "--docs",
            str(tmp_path),
            "--no-plot",
            "--no-save",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "levels-evaluation.md").read_text()
    for workload in ("random 4K", "sequential 256K", "hot-spot 4K"):
        assert f"**{workload}**" in page
    for policy in ("on close", "every 1 s", "4 KiB changed", "idle 100 ms"):
        assert f"| {policy} |" in page
    assert "levels_eval: 30 runs" in proc.stdout
