#!/usr/bin/env python3
"""Benchmark: ``qbitmap check IMAGE`` against ``qemu-img check IMAGE``.

Both check the shared benchmark image (2 TiB, one 64 KiB-granularity bitmap
``b0`` after 200,000 scattered 64 KiB writes; see ``common.big_image``):
qemu-img walks every L1/L2 table and compares all refcounts; qbitmap builds
its reference map from the same tables (numpy over the L2 tables and the
refcount blocks) and checks the bitmaps on top.  Whole-process wall time,
the two commands alternating in the same run, median of N rounds
(``--runs``, default 9).  Target: ratio (qbitmap / qemu-img) <= 1.0.

Both must call the image clean (exit 0) before anything is timed.  Peak RSS
is reported for both.  Writes bench/results/check.json and prints a table.
Not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed rounds per side (default 9)")
    args = parser.parse_args()

    spec = common.BIG
    image = common.big_image(common.WORK_DIR, spec)
    common.compile_bytecode()  # as pip install does; PYTHONDONTWRITEBYTECODE shells would recompile
    ours_argv = common.qbitmap_argv("check", str(image))
    peer_argv = ["qemu-img", "check", str(image)]

    # Warm the page cache and the .pyc files; both must find the image clean.
    report = json.loads(
        subprocess.run(
            common.qbitmap_argv("check", "--json", str(image)), capture_output=True, check=False
        ).stdout
    )
    peer_rc = subprocess.run(peer_argv, capture_output=True, check=False).returncode
    if report["exit_code"] != 0 or peer_rc != 0:
        print(
            f"bench_check: the benchmark image is not clean: qbitmap exit {report['exit_code']} "
            f"({[f['code'] for f in report['findings']]}), qemu-img check exit {peer_rc}",
            file=sys.stderr,
        )
        return 1

    ours_runs, peer_runs = common.alternate(
        lambda: common.measure(ours_argv), lambda: common.measure(peer_argv), args.runs
    )
    ours_wall = statistics.median(m.wall for m in ours_runs)
    peer_wall = statistics.median(m.wall for m in peer_runs)
    ratio = ours_wall / peer_wall
    ours_rss = max(m.maxrss_kib for m in ours_runs)
    peer_rss = max(m.maxrss_kib for m in peer_runs)
    interpreter = min((common.python_baseline() for _ in range(3)), key=lambda m: m.wall)
    imports = min(
        (
            common.measure(
                [sys.executable, "-c", "import qbitmap.cli, qbitmap.check, qbitmap.render.check"]
            )
            for _ in range(3)
        ),
        key=lambda m: m.wall,
    )

    rows = [
        [
            "qbitmap check",
            f"{ours_wall:.3f}",
            f"{min(m.wall for m in ours_runs):.3f}",
            f"{ours_rss / 1024:.1f}",
        ],
        [
            "qemu-img check",
            f"{peer_wall:.3f}",
            f"{min(m.wall for m in peer_runs):.3f}",
            f"{peer_rss / 1024:.1f}",
        ],
    ]
    print(f"check: {image.name} ({image.stat().st_size / 2**20:.0f} MiB file), {args.runs} rounds")
    common.print_table(["command", "median s", "best s", "max RSS MiB"], rows)
    print(
        f"ratio (median qbitmap / median qemu-img): {ratio:.2f}  (target <= 1.00: "
        f"{'met' if ratio <= 1.0 else 'NOT met'})"
    )
    print(
        f"of qbitmap's time: bare interpreter {interpreter.wall:.3f} s, interpreter + imports "
        f"{imports.wall:.3f} s"
    )
    path = common.save_results(
        "check",
        {
            "benchmark": "check",
            "image": {
                "file": image.name,
                "file_size": image.stat().st_size,
                "virtual_size": spec.virtual_size,
                "granularity": spec.granularity,
                "writes": spec.writes,
                "write_size": spec.write_size,
                "seed": spec.seed,
            },
            "runs": args.runs,
            "qbitmap": {
                "argv": ours_argv,
                "median_wall": ours_wall,
                "walls": [m.wall for m in ours_runs],
                "maxrss_kib": ours_rss,
                "exit_code": report["exit_code"],
            },
            "peer": {
                "argv": peer_argv,
                "median_wall": peer_wall,
                "walls": [m.wall for m in peer_runs],
                "maxrss_kib": peer_rss,
                "exit_code": peer_rc,
            },
            "ratio": ratio,
            "ratio_target": 1.0,
            "ratio_met": ratio <= 1.0,
            "startup": {"interpreter_wall": interpreter.wall, "imports_wall": imports.wall},
        },
    )
    print(f"saved {path.relative_to(common.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
