#!/usr/bin/env python3
"""Benchmark: ``qbitmap dump --json --extents -b b0`` against qemu-nbd + nbdinfo.

Both read the dirty ranges of bitmap ``b0`` of the shared benchmark image
(2 TiB, 64 KiB granularity, 200,000 scattered 64 KiB writes; see
``common.big_image``).  The peer is the pipeline users run today: start
``qemu-nbd -r -B b0``, wait for its socket, ``nbdinfo --json
--map=qemu:dirty-bitmap:b0``, stop the server.  Whole-process wall time,
measured alternately in the same run, median of N rounds (``--runs``,
default 7).  Target: ratio (qbitmap / pipeline) <= 1.0.

Memory: peak RSS of the qbitmap process (GNU time), split into the bare
interpreter (``python -c pass``), the imports (the same interpreter after
importing click, numpy and qbitmap's dump modules) and the
working set above that, which is held against a budget of 4x the bitmap
data plus the JSON output.  Both outputs are checked to describe the same
dirty ranges before anything is timed.

Writes bench/results/dump.json and prints a table.  Not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def dirty_ranges_from_nbdinfo(path: Path) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for e in json.loads(path.read_text()):
        if not e["type"] & 1:
            continue
        if merged and merged[-1][0] + merged[-1][1] == e["offset"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["offset"], e["length"]])
    return [(s, n) for s, n in merged]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per side (default 7)")
    args = parser.parse_args()

    spec = common.BIG
    image = common.big_image(common.WORK_DIR, spec)
    common.compile_bytecode()
    out_dir = common.WORK_DIR / "dump-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    ours_out = out_dir / "qbitmap.json"
    peer_out = out_dir / "nbdinfo.json"
    argv = common.qbitmap_argv("dump", "--json", "--extents", "-b", spec.bitmap, str(image))

    def ours() -> common.Measurement:
        with open(ours_out, "wb") as fh:
            return common.measure(argv, stdout=fh)

    def peer() -> common.Measurement:
        with open(peer_out, "wb") as fh:
            return common.nbd_dirty_map(image, spec.bitmap, stdout=fh)

    # Warm the page cache and the .pyc files; check both agree before timing.
    ours()
    peer()
    report = json.loads(ours_out.read_text())
    bitmap = report["bitmaps"][0]
    ours_ranges = [(e["start"], e["length"]) for e in bitmap["extents"]]
    peer_ranges = dirty_ranges_from_nbdinfo(peer_out)
    if ours_ranges != peer_ranges:
        print(
            f"bench_dump: MISMATCH: qbitmap has {len(ours_ranges)} ranges, "
            f"nbdinfo {len(peer_ranges)}",
            file=sys.stderr,
        )
        return 1

    ours_runs, peer_runs = common.alternate(ours, peer, args.runs)
    ours_wall = statistics.median(m.wall for m in ours_runs)
    peer_wall = statistics.median(m.wall for m in peer_runs)
    ratio = ours_wall / peer_wall

    interpreter = min((common.python_baseline() for _ in range(3)), key=lambda m: m.maxrss_kib)
    imports = common.measure(
        [sys.executable, "-c", "import qbitmap.cli, qbitmap.inspect, qbitmap.render.dump"]
    )
    maxrss = max(m.maxrss_kib for m in ours_runs)
    data_bytes = -(-spec.virtual_size // spec.granularity) // 8
    output_bytes = ours_out.stat().st_size
    budget_kib = (4 * data_bytes + output_bytes) // 1024
    working_kib = maxrss - interpreter.maxrss_kib

    rows = [
        [
            "qbitmap dump --json --extents",
            f"{ours_wall:.3f}",
            f"{min(m.wall for m in ours_runs):.3f}",
            f"{maxrss / 1024:.1f}",
            f"{output_bytes / 2**20:.1f}",
        ],
        [
            "qemu-nbd + nbdinfo --json --map",
            f"{peer_wall:.3f}",
            f"{min(m.wall for m in peer_runs):.3f}",
            f"{max(m.maxrss_kib for m in peer_runs) / 1024:.1f}",
            f"{peer_out.stat().st_size / 2**20:.1f}",
        ],
    ]
    print(
        f"dump: {len(ours_ranges)} dirty ranges of {spec.bitmap!r} on {image.name}, "
        f"{args.runs} rounds"
    )
    common.print_table(["command", "median s", "best s", "max RSS MiB", "output MiB"], rows)
    print(
        f"ratio (median qbitmap / median pipeline): {ratio:.2f}  (target <= 1.00: "
        f"{'met' if ratio <= 1.0 else 'NOT met'})"
    )
    imports_kib = imports.maxrss_kib - interpreter.maxrss_kib
    working_above_imports_kib = maxrss - imports.maxrss_kib
    print(
        f"memory: peak {maxrss / 1024:.1f} MiB"
        f" = bare interpreter {interpreter.maxrss_kib / 1024:.1f}"
        f" + imports (click, numpy, qbitmap) {imports_kib / 1024:.1f}"
        f" + working set {working_above_imports_kib / 1024:.1f} MiB"
    )
    print(
        f"        budget 4 x {data_bytes / 2**20:.1f} MiB bitmap data"
        f" + {output_bytes / 2**20:.1f} MiB output = {budget_kib / 1024:.1f} MiB: working set "
        f"{'within' if working_above_imports_kib <= budget_kib else 'OVER'}; "
        f"imports + working set {working_kib / 1024:.1f} MiB "
        f"{'within' if working_kib <= budget_kib else 'over'}"
    )
    path = common.save_results(
        "dump",
        {
            "benchmark": "dump",
            "image": {
                "file": image.name,
                "virtual_size": spec.virtual_size,
                "granularity": spec.granularity,
                "writes": spec.writes,
                "write_size": spec.write_size,
                "seed": spec.seed,
                "dirty_ranges": len(ours_ranges),
                "dirty_bytes": bitmap["dirty_bytes"],
            },
            "runs": args.runs,
            "qbitmap": {
                "argv": argv,
                "median_wall": ours_wall,
                "walls": [m.wall for m in ours_runs],
                "maxrss_kib": maxrss,
                "output_bytes": output_bytes,
            },
            "peer": {
                "argv": peer_runs[0].argv,
                "median_wall": peer_wall,
                "walls": [m.wall for m in peer_runs],
                "maxrss_kib": max(m.maxrss_kib for m in peer_runs),
                "parts": peer_runs[0].parts,
                "output_bytes": peer_out.stat().st_size,
            },
            "ratio": ratio,
            "ratio_target": 1.0,
            "ratio_met": ratio <= 1.0,
            "memory": {
                "interpreter_maxrss_kib": interpreter.maxrss_kib,
                "imports_maxrss_kib": imports.maxrss_kib,
                "bitmap_data_bytes": data_bytes,
                "output_bytes": output_bytes,
                "budget_kib": budget_kib,
                "above_interpreter_kib": working_kib,
                "above_imports_kib": working_above_imports_kib,
                "budget_met": working_above_imports_kib <= budget_kib,
                "budget_met_including_imports": working_kib <= budget_kib,
                "exact": all(m.maxrss_exact for m in ours_runs),
            },
            "outputs_agree": True,
        },
    )
    print(f"saved {path.relative_to(common.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
