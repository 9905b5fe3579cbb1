#!/usr/bin/env python3
"""Benchmark: ``qbitmap recover --reference FILE IMAGE`` against ``cat IMAGE FILE``.

A pair (built once per size into ``bench/work/recover-pair-v1-<N>m/``):
FILE is a 4 GiB qcow2 "last backup" holding N MiB of data in 1 MiB extents
scattered over the disk; IMAGE is a copy of it to which N/10 more MiB were
written and whose bitmap ``b0`` is left in use, as after a crash.  The
headline size is a few hundred MiB: 400 (``--mib``, or
``QBITMAP_BENCH_RECOVER_MIB``); ``--sweep`` (default 200,400,800) adds more
sizes, each measured in its own alternating rounds.  A last round uses the
headline backup as a sparse 4 GiB raw file, which ``cat`` reads whole and
recover reads only where it has data (SEEK_DATA/SEEK_HOLE).  Reference mode
must read every allocated byte of both (they are different files) and
compare them; it must not read the 3.5 GiB that are unallocated on both
sides.

Measured in the same run, page cache warm, alternating: the whole
``qbitmap recover`` process (on a fresh copy of IMAGE each round, copied and
written back outside the timing) and ``cat IMAGE FILE > /dev/null``, which
reads exactly the two files' bytes.  Ratio = cat time / recover time, i.e.
recover's throughput over the same bytes relative to cat's.  Target: >= 0.5
for the qcow2 reference at the headline size (both tools read the same
bytes).  recover's fixed cost -- interpreter start, imports, the check (one
reference map, reused for the leak scan), three fsyncs -- is paid whatever
the size, so the ratio grows with the data; the sweep shows how.

Also checked (and saved) for every size: recover read no more file bytes
than the two files hold, compared no more guest bytes than the data extents
cover, and found exactly the granules the extra writes touched.  Writes
``bench/results/recover.json`` and prints a table.  Not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MiB, GiB = 1 << 20, 1 << 30
SIZE = 4 * GiB
EXTENT = MiB
HEADLINE_MIB = int(os.environ.get("QBITMAP_BENCH_RECOVER_MIB", "400"))
SWEEP_MIB = (200, 400, 800)
SEED = 4242
TARGET = 0.5


def pair_dir(base_mib: int) -> Path:
    return common.WORK_DIR / f"recover-pair-v1-{base_mib}m"


def _qemu_io(image: Path, writes: list[tuple[int, int, int]]) -> None:
    script = "".join(f"write -q -P {pattern} {off} {length}\n" for off, length, pattern in writes)
    proc = subprocess.run(
        ["qemu-io", "-t", "unsafe", "-f", "qcow2", str(image)],
        input=script.encode(),
        capture_output=True,
        check=False,
    )
    if proc.returncode or proc.stderr.strip():
        sys.exit(f"bench_recover: qemu-io failed: {proc.stderr.decode()[-400:]}")


def _set_in_use(image: Path, name: bytes) -> None:
    """Flag bitmap *name* in use, as a crashed QEMU leaves it (on-disk data stay stale)."""
    data = image.read_bytes()[:65536]
    hlen = struct.unpack_from(">I", data, 100)[0]
    off = hlen
    while True:
        magic, length = struct.unpack_from(">II", data, off)
        if magic == 0x23852875:
            _nb, _r, _size, dir_off = struct.unpack_from(">IIQQ", data, off + 8)
            break
        if magic == 0:
            sys.exit("bench_recover: no bitmaps extension")
        off += 8 + ((length + 7) & ~7)
    with open(image, "r+b") as f:
        f.seek(dir_off)
        entry = f.read(24 + len(name))
        assert entry[24:] == name
        flags = struct.unpack_from(">I", entry, 12)[0] | 1
        f.seek(dir_off + 12)
        f.write(struct.pack(">I", flags))


def build_pair(base_mib: int) -> tuple[Path, Path, list[tuple[int, int]]]:
    """(image, reference, new writes) with *base_mib* MiB of backed-up data; built once, cached."""
    base_extents, new_extents = base_mib, base_mib // 10
    directory = pair_dir(base_mib)
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "crashed.qcow2"
    backup = directory / "backup.qcow2"
    rng = random.Random(SEED)
    slots = rng.sample(range(SIZE // EXTENT), base_extents + new_extents)
    base = [(s * EXTENT, EXTENT, 1 + i % 250) for i, s in enumerate(slots[:base_extents])]
    # Half the new writes land on backed-up data, half on fresh space.
    new = [(s * EXTENT + 4096, EXTENT // 2, 0xEE) for s in slots[: new_extents // 2]]
    new += [(s * EXTENT, EXTENT, 0xEF) for s in slots[base_extents + new_extents // 2 :]]
    if image.exists() and backup.exists():
        return image, backup, [(o, n) for o, n, _p in new]
    for stale in directory.glob("*"):
        stale.unlink()
    tmp_backup = directory / "backup.tmp"
    tmp_image = directory / "crashed.tmp"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_backup), str(SIZE)], check=True
    )
    _qemu_io(tmp_backup, base)
    shutil.copyfile(tmp_backup, tmp_image)
    subprocess.run(["qemu-img", "bitmap", "--add", str(tmp_image), "b0"], check=True)
    _qemu_io(tmp_image, new)
    _set_in_use(tmp_image, b"b0")
    # Forget what qemu-io stored: the crashed bitmap's on-disk data predate the writes.
    subprocess.run(["qemu-img", "bitmap", "--remove", str(tmp_image), "b0"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(tmp_image), "b0"], check=True)
    _set_in_use(tmp_image, b"b0")
    os.replace(tmp_backup, backup)
    os.replace(tmp_image, image)
    return image, backup, [(o, n) for o, n, _p in new]


def expected_granules(writes: list[tuple[int, int]], g: int = 65536) -> int:
    bits = set()
    for off, length in writes:
        bits.update(range(off // g, -(-(off + length) // g)))
    return len(bits)


def _rounds(
    image: Path, run_image: Path, ours_argv: list[str], cat_argv: list[str], runs: int
) -> tuple[list[common.Measurement], list[common.Measurement]]:
    """*runs* alternating rounds: recover on a fresh copy of *image*, then cat."""
    ours: list[common.Measurement] = []
    peer: list[common.Measurement] = []
    for _ in range(runs):
        shutil.copyfile(image, run_image)
        # Write the copy back now: recover's fsync must not pay for the copy's dirty pages.
        os.sync()
        subprocess.run(cat_argv, stdout=subprocess.DEVNULL, check=True)  # warm the fresh copy
        ours.append(common.measure(ours_argv))
        peer.append(common.measure(cat_argv))
    return ours, peer


def measure_size(base_mib: int, runs: int) -> dict[str, Any] | None:
    """Build (once) and measure the pair of *base_mib* MiB; None if recover failed."""
    image, backup, new_writes = build_pair(base_mib)
    run_image = pair_dir(base_mib) / "run.qcow2"
    ours_argv = common.qbitmap_argv("recover", "--json", "--reference", str(backup), str(run_image))
    cat_argv = ["cat", str(run_image), str(backup)]

    # A checked run first (also warms the page cache and the .pyc files).
    shutil.copyfile(image, run_image)
    proc = subprocess.run(ours_argv, capture_output=True, check=False)
    if proc.returncode != 0:
        print(f"bench_recover: recover failed: {proc.stderr.decode()[-500:]}", file=sys.stderr)
        return None
    report = json.loads(proc.stdout)
    ref = report["reference"]
    file_bytes = image.stat().st_size + backup.stat().st_size
    data_bytes = (base_mib + base_mib // 10) * EXTENT
    checks = {
        "recovered": report["status"] == "recovered",
        "granules_exact": ref["differing_granules"] == expected_granules(new_writes),
        "read_at_most_the_files": ref["image_bytes_read"] + ref["reference_bytes_read"]
        <= file_bytes,
        "compared_only_data": ref["compared_bytes"] <= data_bytes,
        "skipped_unallocated": ref["skipped_bytes"] >= SIZE - data_bytes,
    }
    subprocess.run(cat_argv, stdout=subprocess.DEVNULL, check=True)
    ours, peer = _rounds(image, run_image, ours_argv, cat_argv, runs)
    run_image.unlink(missing_ok=True)
    ours_wall = statistics.median(m.wall for m in ours)
    peer_wall = statistics.median(m.wall for m in peer)
    return {
        "mib": base_mib,
        "pair": {
            "virtual_size": SIZE,
            "reference_data_bytes": base_mib * EXTENT,
            "new_write_bytes": sum(n for _o, n in new_writes),
            "image_file_size": image.stat().st_size,
            "reference_file_size": backup.stat().st_size,
        },
        "file_bytes": file_bytes,
        "qbitmap": {
            "argv": ours_argv,
            "median_wall": ours_wall,
            "walls": [m.wall for m in ours],
            "maxrss_kib": max(m.maxrss_kib for m in ours),
        },
        "cat": {
            "argv": cat_argv,
            "median_wall": peer_wall,
            "walls": [m.wall for m in peer],
            "maxrss_kib": max(m.maxrss_kib for m in peer),
        },
        "ratio": peer_wall / ours_wall,
        "reference_report": ref,
        "checks": checks,
    }


def measure_raw(base_mib: int, runs: int) -> dict[str, float]:
    """The headline pair with the sparse raw reference (cat reads all 4 GiB of it)."""
    image, backup, _new = build_pair(base_mib)
    run_image = pair_dir(base_mib) / "run.qcow2"
    raw = pair_dir(base_mib) / "backup.raw"
    if not raw.exists():
        tmp = raw.with_suffix(".tmp")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(backup), str(tmp)], check=True)
        os.replace(tmp, raw)
    ours, peer = _rounds(
        image,
        run_image,
        common.qbitmap_argv("recover", "--json", "--reference", str(raw), str(run_image)),
        ["cat", str(run_image), str(raw)],
        runs,
    )
    run_image.unlink(missing_ok=True)
    ours_wall = statistics.median(m.wall for m in ours)
    peer_wall = statistics.median(m.wall for m in peer)
    return {
        "qbitmap_median_wall": ours_wall,
        "cat_median_wall": peer_wall,
        "ratio": peer_wall / ours_wall,
    }


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per side (default 7)")
    parser.add_argument(
        "--mib",
        type=int,
        default=HEADLINE_MIB,
        help=f"backed-up data of the headline pair, MiB (default {HEADLINE_MIB})",
    )
    parser.add_argument(
        "--sweep",
        type=_sizes,
        default=list(SWEEP_MIB),
        help="comma-separated sizes (MiB) measured as well (default "
        + ",".join(map(str, SWEEP_MIB))
        + "; empty for none)",
    )
    args = parser.parse_args()
    common.compile_bytecode()
    sizes = sorted({args.mib, *args.sweep})
    results: dict[int, dict[str, Any]] = {}
    for mib in sizes:
        result = measure_size(mib, args.runs)
        if result is None:
            return 1
        results[mib] = result
    head = results[args.mib]
    raw = measure_raw(args.mib, args.runs)

    rows = []
    for mib in sizes:
        r = results[mib]
        rows.append(
            [
                f"{mib}{' *' if mib == args.mib else ''}",
                f"{r['file_bytes'] / MiB:.0f}",
                f"{r['qbitmap']['median_wall']:.3f}",
                f"{r['cat']['median_wall']:.3f}",
                f"{r['file_bytes'] / MiB / r['qbitmap']['median_wall']:.0f}",
                f"{r['file_bytes'] / MiB / r['cat']['median_wall']:.0f}",
                f"{r['qbitmap']['maxrss_kib'] / 1024:.0f}",
                f"{r['ratio']:.2f}",
            ]
        )
    common.print_table(
        [
            "data MiB",
            "file MiB",
            "recover s",
            "cat s",
            "recover MiB/s",
            "cat MiB/s",
            "recover RSS MiB",
            "ratio",
        ],
        rows,
    )
    ratio = head["ratio"]
    print(
        f"ratio at {args.mib} MiB (recover throughput / cat throughput): {ratio:.2f}  "
        f"(target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})"
    )
    print(
        f"with the sparse raw reference ({args.mib} MiB): recover {raw['qbitmap_median_wall']:.3f} s, "
        f"cat {raw['cat_median_wall']:.3f} s, ratio {raw['ratio']:.2f}"
    )
    all_checks = {f"{mib}": results[mib]["checks"] for mib in sizes}
    ok = all(all(c.values()) for c in all_checks.values())
    for mib in sizes:
        checks = results[mib]["checks"]
        print(
            f"checks {mib} MiB: "
            + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items())
        )
    path = common.save_results(
        "recover",
        {
            "benchmark": "recover",
            "headline_mib": args.mib,
            "pair": head["pair"],
            "runs": args.runs,
            "qbitmap": head["qbitmap"],
            "cat": head["cat"],
            "ratio": ratio,
            "raw_reference": raw,
            "target": TARGET,
            "met": ratio >= TARGET,
            "reference_report": head["reference_report"],
            "checks": head["checks"],
            "sweep": [
                {
                    "mib": mib,
                    "file_bytes": results[mib]["file_bytes"],
                    "qbitmap_median_wall": results[mib]["qbitmap"]["median_wall"],
                    "cat_median_wall": results[mib]["cat"]["median_wall"],
                    "qbitmap_walls": results[mib]["qbitmap"]["walls"],
                    "cat_walls": results[mib]["cat"]["walls"],
                    "ratio": results[mib]["ratio"],
                    "met": results[mib]["ratio"] >= TARGET,
                    "checks_ok": all(results[mib]["checks"].values()),
                }
                for mib in sizes
            ],
        },
    )
    print(f"saved {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
