#!/usr/bin/env python3
"""Benchmark: the fixed cost of one qbitmap process, against the bare interpreter.

A backup job calls qbitmap once per disk, so the cost of starting it counts.
Whole-process wall time of ``qbitmap check --json`` and ``qbitmap dump
--json`` on the sample image (examples/sample.qcow2), against the same
virtualenv's ``python -c pass`` and, for context, ``qemu-img check
--output=json`` on the same image.  The commands alternate within each round
so all see the same machine; the table gives medians of wall and CPU time
(user + system) and each one's ratio to ``python -c pass``.  Target:
``check --json`` and ``dump --json`` <= 5x the bare interpreter.

Also recorded: the modules each command imports (``-X importtime``: the
cumulative milliseconds of the heaviest top-level imports), to say where
the time goes.  Writes bench/results/startup.json.  Not a test: it reports.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SAMPLE = common.REPO_DIR / "examples" / "sample.qcow2"
TARGET = 5.0


def _commands() -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "qbitmap check --json": common.qbitmap_argv("check", "--json", str(SAMPLE)),
        "qbitmap dump --json": common.qbitmap_argv("dump", "--json", str(SAMPLE)),
        "qemu-img check --output=json": [
            "qemu-img",
            "check",
            "--output=json",
            "-U",
            str(SAMPLE),
        ],
    }


def _heaviest_imports(argv: list[str], top: int = 6) -> list[tuple[str, float]]:
    """The top-level imports of *argv* with the largest cumulative time (ms)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv[1:]]
        if argv[0] == sys.executable
        else [sys.executable, "-X", "importtime", "-m", "qbitmap", *argv[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if not cumulative.isdigit():
            continue
        # Depth is the indentation of the name: keep packages, not their parts.
        package = name.split(".")[0]
        found[package] = max(found.get(package, 0.0), int(cumulative) / 1000)
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=41, help="rounds (default 41)")
    args = parser.parse_args()
    common.compile_bytecode()
    commands = _commands()
    # Warm the page cache and the bytecode of every command once.
    for argv in commands.values():
        common.measure(argv, check=False)
    wall: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            # check exits 4 on the sample (in-use bitmaps are its point): not a failure here.
            m = common.measure(argv, check=False)
            if m.returncode not in (0, 3, 4):
                raise SystemExit(f"bench: {name} exited {m.returncode}")
            wall[name].append(m.wall)
            cpu[name].append(m.user + m.sys)
    base_wall = statistics.median(wall["python -c pass"])
    base_cpu = statistics.median(cpu["python -c pass"])
    rows, results = [], {}
    for name in commands:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        results[name] = {
            "wall_median_s": w,
            "cpu_median_s": c,
            "wall_ratio": w / base_wall,
            "cpu_ratio": c / base_cpu,
            "wall_s": wall[name],
        }
        rows.append(
            (
                name,
                f"{w * 1000:.1f} ms",
                f"{w / base_wall:.2f}x",
                f"{c * 1000:.1f} ms",
                f"{c / base_cpu:.2f}x",
            )
        )
    common.print_table(("command", "wall (median)", "vs python", "cpu (median)", "vs python"), rows)
    imports = {
        name: _heaviest_imports(commands[name])
        for name in ("qbitmap check --json", "qbitmap dump --json")
    }
    for name, heavy in imports.items():
        print(f"{name}: " + ", ".join(f"{pkg} {ms:.0f} ms" for pkg, ms in heavy))
    for name in ("qbitmap check --json", "qbitmap dump --json"):
        ratio = results[name]["wall_ratio"]
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"target {name} <= {TARGET:.0f}x python -c pass: {ratio:.2f}x, {verdict}")
    common.save_results(
        "startup",
        {
            "runs": args.runs,
            "sample": str(SAMPLE.relative_to(common.REPO_DIR)),
            "target_ratio": TARGET,
            "results": results,
            "heaviest_imports_ms": imports,
            "environment": common.environment(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
