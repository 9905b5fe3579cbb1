#!/usr/bin/env python3
"""Benchmark: ``qbitmap recover --reference FILE IMAGE`` against ``cat IMAGE FILE``.

A pair (built once per size into ``bench/work/recover-pair-v1-<N>m/``):
FILE is a 4 GiB qcow2 "last backup" holding N MiB of data in 1 MiB extents
scattered over the disk (written in random order, so guest order is not file
order); IMAGE is a copy of it to which N/10 more MiB were written and whose
bitmap ``b0`` is left in use, as after a crash.  Reference mode must read
every allocated byte of both (they are different files) and compare them; it
must not read the 3.5 GiB that are unallocated on both sides.  ``cat IMAGE
FILE > /dev/null`` reads exactly the two files' bytes, sequentially: the
storage's own pace.

Three figures, each against cat in the same run, in paired rounds (the two
commands back to back, which one goes first alternating), medians of
``--runs`` rounds (default 7), ratio = cat time / recover time, i.e.
recover's throughput over the same bytes relative to cat's:

* **cold** (headline size, 400 MiB: ``--mib`` or
  ``QBITMAP_BENCH_RECOVER_MIB``): before every run both files are evicted
  from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` -- just
  the two files, never a global cache drop.  Target >= 1.0.  Then the same
  with FILE on a second filesystem: an ext4 image on a loop device
  (``losetup --direct-io=on``, so that the loop device's own reads bypass the
  page cache and eviction makes FILE truly cold; readahead set to the root
  disk's), IMAGE where it is.  Needs root, ``losetup``, ``mkfs.ext4`` and
  ``mount``; skipped with a reason otherwise.
* **warm** (page cache warm) at every size of ``--sweep`` (default
  200,400,800), and the **marginal** throughput between the smallest and the
  largest: (bytes(large) - bytes(small)) / (time(large) - time(small)) from
  the medians, which factors out start-up.  Target: marginal ratio >= 0.8.
  recover's **fixed cost** (interpreter start, imports, the check, three
  fsyncs) is the intercept of that line; cat's too.
* **peak memory** (GNU ``time``'s maximum RSS) of recover at every size and
  in the cold runs: it must stay flat with size.

Every timed recover run works on a fresh copy of IMAGE (copied and written
back outside the timing) and its JSON report is checked: recovered, exactly
the granules the extra writes touched, no more file bytes read than the two
files hold, no more guest bytes compared than the data extents cover, the
unallocated space skipped.  A last warm round uses the headline backup as a
sparse 4 GiB raw file, which cat reads whole and recover only where it has
data (SEEK_DATA/SEEK_HOLE).  Writes ``bench/results/recover.json`` and
prints a table.  Not a test: it reports.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
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
COLD_TARGET = 1.0
MARGINAL_TARGET = 0.8
FLAT_RSS_MIB = 8  # peak RSS may grow by at most this much from the smallest size to the largest


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


def evict(*paths: Path) -> None:
    """Drop *paths* (and only them) from the page cache; dirty pages are written first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(*paths: Path) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


class Pair:
    """One measured pair: IMAGE (a fresh copy per run), FILE, the writes, the checks."""

    def __init__(self, base_mib: int, reference: Path | None = None) -> None:
        self.mib = base_mib
        self.image, backup, self.new_writes = build_pair(base_mib)
        self.reference = reference or backup
        self.run_image = pair_dir(base_mib) / "run.qcow2"
        self.data_bytes = (base_mib + base_mib // 10) * EXTENT
        self.ours_argv = common.qbitmap_argv(
            "recover", "--json", "--reference", str(self.reference), str(self.run_image)
        )
        self.cat_argv = ["cat", str(self.run_image), str(self.reference)]
        self.failures: list[str] = []
        self.reports: list[dict[str, Any]] = []

    @property
    def file_bytes(self) -> int:
        return self.image.stat().st_size + self.reference.stat().st_size

    def fresh_image(self) -> None:
        shutil.copyfile(self.image, self.run_image)
        # Written back now: recover's fsyncs must not pay for the copy's dirty pages.
        evict(self.run_image)

    def checks(self, report: dict[str, Any]) -> dict[str, bool]:
        ref = report["reference"]
        return {
            "recovered": report["status"] == "recovered",
            "granules_exact": ref["differing_granules"] == expected_granules(self.new_writes),
            "read_at_most_the_files": ref["image_bytes_read"] + ref["reference_bytes_read"]
            <= self.file_bytes,
            "compared_only_data": ref["compared_bytes"] <= self.data_bytes,
            "skipped_unallocated": ref["skipped_bytes"] >= SIZE - self.data_bytes,
        }

    def recover(self) -> common.Measurement:
        """One timed recover run; its JSON report checked and kept."""
        with tempfile.TemporaryFile() as out:
            m = common.measure(self.ours_argv, stdout=out, check=False)
            out.seek(0)
            text = out.read()
        if m.returncode != 0:
            sys.exit(f"bench_recover: recover exited {m.returncode}: {text[-500:]!r}")
        report = json.loads(text)
        failed = [k for k, ok in self.checks(report).items() if not ok]
        if failed:
            self.failures.append(f"{self.mib} MiB ({self.reference.name}): {', '.join(failed)}")
        self.reports.append(report)
        return m

    def cat(self) -> common.Measurement:
        return common.measure(self.cat_argv)

    def cleanup(self) -> None:
        self.run_image.unlink(missing_ok=True)


def paired_rounds(
    pair: Pair, runs: int, *, cold: bool
) -> tuple[list[common.Measurement], list[common.Measurement]]:
    """*runs* rounds of recover and cat back to back, the first of the two alternating.

    Cold: both files evicted before each command.  Warm: both read once first.
    """
    ours: list[common.Measurement] = []
    peer: list[common.Measurement] = []
    for r in range(runs):
        pair.fresh_image()

        def prepare() -> None:
            if cold:
                evict(pair.run_image, pair.reference)
            else:
                warm(pair.run_image, pair.reference)

        steps: list[tuple[Callable[[], common.Measurement], list[common.Measurement]]] = [
            (pair.recover, ours),
            (pair.cat, peer),
        ]
        if r % 2:
            steps.reverse()
        for run, into in steps:
            prepare()
            into.append(run())
    pair.cleanup()
    return ours, peer


def summary(ours: list[common.Measurement], peer: list[common.Measurement]) -> dict[str, Any]:
    ow = [m.wall for m in ours]
    pw = [m.wall for m in peer]
    return {
        "qbitmap_median_wall": statistics.median(ow),
        "cat_median_wall": statistics.median(pw),
        # Paired: each round's cat / recover, then the median; robust to a noisy round.
        "ratio": statistics.median(p / o for o, p in zip(ow, pw, strict=True)),
        "qbitmap_walls": ow,
        "cat_walls": pw,
        "qbitmap_maxrss_kib": max(m.maxrss_kib for m in ours),
        "qbitmap_user": statistics.median(m.user for m in ours),
        "qbitmap_sys": statistics.median(m.sys for m in ours),
    }


@contextlib.contextmanager
def second_filesystem(size: int) -> Iterator[tuple[Path | None, str]]:
    """A scratch ext4 on a loop device (direct I/O); yields (mount point, how) or (None, why not)."""
    if os.geteuid() != 0:
        yield None, "needs root (losetup, mount)"
        return
    missing = [t for t in ("losetup", "mkfs.ext4", "mount", "umount") if shutil.which(t) is None]
    if missing:
        yield None, f"missing tools: {', '.join(missing)}"
        return
    backing = common.WORK_DIR / "second-fs.img"
    mount = common.WORK_DIR / "second-fs"
    backing.unlink(missing_ok=True)
    with open(backing, "wb") as f:
        f.truncate(size)
    loop = ""
    mounted = False

    def cleanup() -> None:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        backing.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mount.rmdir()

    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
        loop = subprocess.run(
            ["losetup", "--direct-io=on", "--show", "-f", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        root_dev = _root_device()
        if root_dev:
            ra = Path(f"/sys/block/{root_dev}/queue/read_ahead_kb").read_text().strip()
            Path(f"/sys/block/{Path(loop).name}/queue/read_ahead_kb").write_text(ra)
        mount.mkdir(exist_ok=True)
        subprocess.run(["mount", loop, str(mount)], check=True, capture_output=True)
        mounted = True
    except (subprocess.CalledProcessError, OSError) as exc:
        cleanup()
        detail = getattr(exc, "stderr", "") or str(exc)
        yield None, f"could not set up a loop-mounted ext4: {str(detail).strip()[-200:]}"
        return
    try:
        yield mount, f"ext4 on {loop} (direct I/O, read_ahead_kb of {root_dev or 'default'})"
    finally:
        cleanup()


def _root_device() -> str | None:
    """The block device (e.g. ``vda``) of the filesystem holding bench/work, if it is one."""
    st = os.stat(common.WORK_DIR)
    sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        name = sys_dev.resolve().name
    except OSError:
        return None
    if (Path("/sys/block") / name).exists():
        return name
    parent = sys_dev.resolve().parent.name  # a partition: its disk holds the queue settings
    return parent if (Path("/sys/block") / parent).exists() else None


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="paired rounds per figure (default 7)")
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
        help="comma-separated sizes (MiB) measured warm; the marginal throughput runs from the "
        "smallest to the largest (default " + ",".join(map(str, SWEEP_MIB)) + ")",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to leave out: cold, twofs, warm, raw"
    )
    args = parser.parse_args()
    skip = set(_sizes_or_words(args.skip))
    common.compile_bytecode()
    sizes = sorted({args.mib, *args.sweep})
    load_before = os.getloadavg()
    out: dict[str, Any] = {"benchmark": "recover", "headline_mib": args.mib, "runs": args.runs}
    failures: list[str] = []

    head = Pair(args.mib)
    # One checked run first (also warms the .pyc files).
    head.fresh_image()
    head.recover()
    out["pair"] = {
        "virtual_size": SIZE,
        "reference_data_bytes": args.mib * EXTENT,
        "new_write_bytes": sum(n for _o, n in head.new_writes),
        "image_file_size": head.image.stat().st_size,
        "reference_file_size": head.reference.stat().st_size,
    }
    out["reference_report"] = head.reports[-1]["reference"]
    out["checks"] = head.checks(head.reports[-1])

    if "cold" not in skip:
        out["cold"] = summary(*paired_rounds(head, args.runs, cold=True))
        out["cold"]["file_bytes"] = head.file_bytes
    failures += head.failures

    if "twofs" not in skip:
        with second_filesystem(head.reference.stat().st_size + 256 * MiB) as (mount, how):
            out["cold_two_filesystems"] = {"setup": how}
            if mount is not None:
                reference = mount / head.reference.name
                shutil.copyfile(head.reference, reference)
                pair = Pair(args.mib, reference)
                out["cold_two_filesystems"].update(
                    summary(*paired_rounds(pair, args.runs, cold=True))
                )
                failures += pair.failures
                reference.unlink()

    warm_results: dict[int, dict[str, Any]] = {}
    if "warm" not in skip:
        pairs = {mib: Pair(mib) for mib in sizes}
        rounds: dict[int, tuple[list[common.Measurement], list[common.Measurement]]] = {
            mib: ([], []) for mib in sizes
        }
        # Sizes interleaved within each round, so that a noisy spell hits all of them.
        for r in range(args.runs):
            for mib in sizes if r % 2 == 0 else reversed(sizes):
                o, p = paired_rounds(pairs[mib], 1, cold=False)
                rounds[mib][0].extend(o)
                rounds[mib][1].extend(p)
        for mib in sizes:
            warm_results[mib] = summary(*rounds[mib])
            warm_results[mib]["file_bytes"] = pairs[mib].file_bytes
            failures += pairs[mib].failures
        out["warm"] = [{"mib": mib, **warm_results[mib]} for mib in sizes]
        lo, hi = warm_results[sizes[0]], warm_results[sizes[-1]]
        if hi is not lo:
            dbytes = hi["file_bytes"] - lo["file_bytes"]
            ours_slope = dbytes / (hi["qbitmap_median_wall"] - lo["qbitmap_median_wall"])
            cat_slope = dbytes / (hi["cat_median_wall"] - lo["cat_median_wall"])
            out["warm_marginal"] = {
                "from_mib": sizes[0],
                "to_mib": sizes[-1],
                "qbitmap_bytes_per_s": ours_slope,
                "cat_bytes_per_s": cat_slope,
                "ratio": ours_slope / cat_slope,
                "qbitmap_fixed_cost_s": lo["qbitmap_median_wall"] - lo["file_bytes"] / ours_slope,
                "cat_fixed_cost_s": lo["cat_median_wall"] - lo["file_bytes"] / cat_slope,
            }
        rss = [warm_results[mib]["qbitmap_maxrss_kib"] for mib in sizes]
        out["peak_rss_kib"] = {str(mib): kib for mib, kib in zip(sizes, rss, strict=True)}
        out["peak_rss_flat"] = rss[-1] - rss[0] <= FLAT_RSS_MIB * 1024

    if "raw" not in skip:
        raw = pair_dir(args.mib) / "backup.raw"
        if not raw.exists():
            tmp = raw.with_suffix(".tmp")
            subprocess.run(
                ["qemu-img", "convert", "-O", "raw", str(head.reference), str(tmp)], check=True
            )
            os.replace(tmp, raw)
        raw_pair = Pair(args.mib, raw)
        out["raw_reference_warm"] = summary(*paired_rounds(raw_pair, args.runs, cold=False))
        failures += raw_pair.failures

    out["load_average"] = {"before": load_before, "after": os.getloadavg()}
    out["failures"] = failures
    _print(out, sizes)
    path = common.save_results("recover", out)
    print(f"saved {path}")
    return 0 if not failures else 1


def _sizes_or_words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _print(out: dict[str, Any], sizes: list[int]) -> None:
    rows = []

    def row(name: str, r: dict[str, Any], target: str) -> None:
        rows.append(
            [
                name,
                f"{r['qbitmap_median_wall']:.3f} s",
                f"{r['cat_median_wall']:.3f} s",
                f"{r['ratio']:.2f}",
                f"{r['qbitmap_maxrss_kib'] / 1024:.0f}",
                target,
            ]
        )

    head = out["headline_mib"]
    if "cold" in out:
        row(f"cold, {head} MiB per side", out["cold"], f">= {COLD_TARGET}")
    two = out.get("cold_two_filesystems", {})
    if "ratio" in two:
        row(f"cold, two filesystems, {head} MiB", two, f">= {COLD_TARGET}")
    for w in out.get("warm", []):
        row(f"warm, {w['mib']} MiB per side", w, "")
    if "raw_reference_warm" in out:
        row(f"warm, sparse raw FILE, {head} MiB", out["raw_reference_warm"], "")
    common.print_table(["figure", "recover", "cat", "ratio", "RSS MiB", "target"], rows)
    if two and "ratio" not in two:
        print(f"two filesystems: skipped: {two['setup']}")
    marginal = out.get("warm_marginal")
    if marginal:
        print(
            f"warm marginal {marginal['from_mib']} -> {marginal['to_mib']} MiB: recover "
            f"{marginal['qbitmap_bytes_per_s'] / 1e9:.2f} GB/s, cat "
            f"{marginal['cat_bytes_per_s'] / 1e9:.2f} GB/s, ratio {marginal['ratio']:.2f} "
            f"(target >= {MARGINAL_TARGET}); fixed cost: recover "
            f"{marginal['qbitmap_fixed_cost_s']:.3f} s, cat {marginal['cat_fixed_cost_s']:.3f} s"
        )
    if "peak_rss_kib" in out:
        print(
            "peak RSS by size: "
            + ", ".join(f"{k} MiB: {v / 1024:.0f} MiB" for k, v in out["peak_rss_kib"].items())
            + f" ({'flat' if out['peak_rss_flat'] else 'NOT flat'})"
        )
    load = out["load_average"]
    print(f"load average (1 min) before {load['before'][0]:.1f}, after {load['after'][0]:.1f}")
    checks = out["checks"]
    print("checks: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in checks.items()))
    for failure in out["failures"]:
        print(f"check FAILED in a timed run: {failure}")


if __name__ == "__main__":
    sys.exit(main())
