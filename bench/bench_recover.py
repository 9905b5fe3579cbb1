#!/usr/bin/env python3
"""Benchmark: ``qbitmap recover --reference FILE IMAGE`` against ``cat IMAGE FILE``.

The pair (built once into ``bench/work/recover-pair-v1-800m/``): FILE is a
4 GiB qcow2 "last backup" holding 800 MiB of data in 1 MiB extents
scattered over the disk; IMAGE is a copy of it to which 80 more MiB were
written and whose bitmap ``b0`` is left in use, as after a crash
(``QBITMAP_BENCH_RECOVER_MIB`` changes the 800).  A second round uses the
same backup as a sparse 4 GiB raw file, which ``cat`` reads whole and
recover reads only where it has data (SEEK_DATA/SEEK_HOLE).  Reference mode must read
every allocated byte of both (they are different files) and compare them;
it must not read the 3.5 GiB that are unallocated on both sides.

Measured in the same run, page cache warm, alternating: the whole
``qbitmap recover`` process (on a fresh copy of IMAGE each round, copied
outside the timing) and ``cat IMAGE FILE > /dev/null``, which reads exactly
the two files' bytes.  Ratio = cat time / recover time, i.e. recover's
throughput over the same bytes relative to cat's.  Target: >= 0.5 for the
qcow2 reference (the headline ``ratio``: both tools read the same bytes).
recover's fixed cost -- interpreter start, imports, the check, three
fsyncs -- is about 0.2-0.25 s here, so the ratio grows with the data: with
400 MiB it was 0.34, with 800 MiB 0.56 on the 2-core development machine.

Also checked (and saved): recover read no more file bytes than the two
files hold, compared no more guest bytes than the data extents cover, and
found exactly the granules the extra writes touched.  Writes
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

MiB, GiB = 1 << 20, 1 << 30
SIZE = 4 * GiB
EXTENT = MiB
BASE_EXTENTS = int(os.environ.get("QBITMAP_BENCH_RECOVER_MIB", "800"))
NEW_EXTENTS = BASE_EXTENTS // 10
SEED = 4242
PAIR_DIR = common.WORK_DIR / f"recover-pair-v1-{BASE_EXTENTS}m"


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


def build_pair() -> tuple[Path, Path, list[tuple[int, int]]]:
    """(image, reference, new writes); built once, cached."""
    PAIR_DIR.mkdir(parents=True, exist_ok=True)
    image = PAIR_DIR / "crashed.qcow2"
    backup = PAIR_DIR / "backup.qcow2"
    rng = random.Random(SEED)
    slots = rng.sample(range(SIZE // EXTENT), BASE_EXTENTS + NEW_EXTENTS)
    base = [(s * EXTENT, EXTENT, 1 + i % 250) for i, s in enumerate(slots[:BASE_EXTENTS])]
    # Half the new writes land on backed-up data, half on fresh space.
    new = [(s * EXTENT + 4096, EXTENT // 2, 0xEE) for s in slots[: NEW_EXTENTS // 2]]
    new += [(s * EXTENT, EXTENT, 0xEF) for s in slots[BASE_EXTENTS + NEW_EXTENTS // 2 :]]
    if image.exists() and backup.exists():
        return image, backup, [(o, n) for o, n, _p in new]
    for stale in PAIR_DIR.glob("*"):
        stale.unlink()
    tmp_backup = PAIR_DIR / "backup.tmp"
    tmp_image = PAIR_DIR / "crashed.tmp"
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
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(tmp_backup), str(PAIR_DIR / "backup.raw")],
        check=True,
    )
    os.replace(tmp_backup, backup)
    os.replace(tmp_image, image)
    return image, backup, [(o, n) for o, n, _p in new]


def expected_granules(writes: list[tuple[int, int]], g: int = 65536) -> int:
    bits = set()
    for off, length in writes:
        bits.update(range(off // g, -(-(off + length) // g)))
    return len(bits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per side (default 7)")
    args = parser.parse_args()
    common.compile_bytecode()
    image, backup, new_writes = build_pair()
    run_image = PAIR_DIR / "run.qcow2"
    ours_argv = common.qbitmap_argv("recover", "--json", "--reference", str(backup), str(run_image))
    cat_argv = ["cat", str(run_image), str(backup)]

    # A checked run first (also warms the page cache and the .pyc files).
    shutil.copyfile(image, run_image)
    proc = subprocess.run(ours_argv, capture_output=True, check=False)
    if proc.returncode != 0:
        print(f"bench_recover: recover failed: {proc.stderr.decode()[-500:]}", file=sys.stderr)
        return 1
    report = json.loads(proc.stdout)
    ref = report["reference"]
    file_bytes = image.stat().st_size + backup.stat().st_size
    data_bytes = (BASE_EXTENTS + NEW_EXTENTS) * EXTENT
    checks = {
        "recovered": report["status"] == "recovered",
        "granules_exact": ref["differing_granules"] == expected_granules(new_writes),
        "read_at_most_the_files": ref["image_bytes_read"] + ref["reference_bytes_read"]
        <= file_bytes,
        "compared_only_data": ref["compared_bytes"] <= data_bytes,
        "skipped_unallocated": ref["skipped_bytes"] >= SIZE - data_bytes,
    }
    subprocess.run(cat_argv, stdout=subprocess.DEVNULL, check=True)

    def rounds(ours_argv: list[str], cat_argv: list[str]) -> tuple[list, list]:
        ours: list[common.Measurement] = []
        peer: list[common.Measurement] = []
        for _ in range(args.runs):
            shutil.copyfile(image, run_image)
            # Write the copy back now: recover's fsync must not pay for the copy's dirty pages.
            os.sync()
            subprocess.run(cat_argv, stdout=subprocess.DEVNULL, check=True)  # warm the fresh copy
            ours.append(common.measure(ours_argv))
            peer.append(common.measure(cat_argv))
        return ours, peer

    ours, peer = rounds(ours_argv, cat_argv)
    raw = PAIR_DIR / "backup.raw"
    raw_ours, raw_peer = rounds(
        common.qbitmap_argv("recover", "--json", "--reference", str(raw), str(run_image)),
        ["cat", str(run_image), str(raw)],
    )
    run_image.unlink(missing_ok=True)
    ours_wall = statistics.median(m.wall for m in ours)
    peer_wall = statistics.median(m.wall for m in peer)
    ratio = peer_wall / ours_wall
    raw_ours_wall = statistics.median(m.wall for m in raw_ours)
    raw_peer_wall = statistics.median(m.wall for m in raw_peer)
    raw_ratio = raw_peer_wall / raw_ours_wall
    common.print_table(
        ["command", "median wall s", "throughput MiB/s", "peak RSS MiB"],
        [
            [
                "qbitmap recover --reference",
                f"{ours_wall:.3f}",
                f"{file_bytes / MiB / ours_wall:.0f}",
                f"{max(m.maxrss_kib for m in ours) / 1024:.0f}",
            ],
            [
                "cat IMAGE FILE",
                f"{peer_wall:.3f}",
                f"{file_bytes / MiB / peer_wall:.0f}",
                f"{max(m.maxrss_kib for m in peer) / 1024:.0f}",
            ],
            ["recover --reference FILE.raw", f"{raw_ours_wall:.3f}", "-", "-"],
            ["cat IMAGE FILE.raw (4 GiB)", f"{raw_peer_wall:.3f}", "-", "-"],
        ],
    )
    print(f"ratio (recover throughput / cat throughput): {ratio:.2f}  (target >= 0.5)")
    print(f"ratio with the sparse raw reference: {raw_ratio:.2f}")
    print("checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    path = common.save_results(
        "recover",
        {
            "benchmark": "recover",
            "pair": {
                "virtual_size": SIZE,
                "reference_data_bytes": BASE_EXTENTS * EXTENT,
                "new_write_bytes": sum(n for _o, n in new_writes),
                "image_file_size": image.stat().st_size,
                "reference_file_size": backup.stat().st_size,
            },
            "runs": args.runs,
            "qbitmap": {
                "argv": ours_argv,
                "median_wall": ours_wall,
                "walls": [m.wall for m in ours],
            },
            "cat": {"argv": cat_argv, "median_wall": peer_wall, "walls": [m.wall for m in peer]},
            "ratio": ratio,
            "raw_reference": {
                "qbitmap_median_wall": raw_ours_wall,
                "cat_median_wall": raw_peer_wall,
                "ratio": raw_ratio,
            },
            "target": 0.5,
            "met": ratio >= 0.5,
            "reference_report": ref,
            "checks": checks,
        },
    )
    print(f"saved {path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
