#!/usr/bin/env python3
"""Benchmark: ``qbitmap checkpoints --all`` against ``qemu-img info --backing-chain`` per disk.

A synthetic libvirt host (no libvirtd needed: ``--config-dir`` and
``--checkpoint-dir`` point at it): 20 domains x 2 qcow2 disks x 3 chain
layers (base <- mid <- top, as two disk-only snapshots leave them) x 10
checkpoints.  Per disk, the top image has the bitmaps of all 10 checkpoints,
``mid`` those of the first 7, ``base`` those of the first 4, each layer with
guest writes recorded in its bitmaps; per domain, libvirt's 10 checkpoint
files and its persistent definition (both made from libvirt's own files in
tests/fixtures/libvirt).  The images are built once into bench/work/ with
qemu-img and qemu-io (one disk chain, copied).

qbitmap: one process, ``checkpoints --all --json``, which reads every
definition and checkpoint file, follows every chain and checks every layer
by the rules QEMU applies when it opens an image (``check_image``'s open
scope, what libvirt's verdict depends on).  The peer gathers the same image information the way
scripts do today: ``qemu-img info --backing-chain --output=json -U`` once
per disk (40 processes, run one after the other by one shell).  Whole
wall time, the two alternating in the same run, median of N rounds
(``--runs``, default 9).  Target: ratio (qbitmap / qemu-img) <= 1.0.

A second host three times as large (60 domains, the same disks) is timed
the same way, so that the cost of one more disk -- the slope between the two
hosts -- is reported apart from each tool's fixed cost, with the host size
from which qbitmap is the faster.

Before timing, both must report the same layers and the same bitmaps with
the same flags for every disk.  Writes bench/results/checkpoints.json.
Not a test: it reports.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common
from libvirt_files import Disk, Host

DOMAINS = 20
LARGE_DOMAINS = 3 * DOMAINS  # the second host, for the cost of one more disk
DISKS = ("vda", "vdb")
CHECKPOINTS = 10
# Checkpoints whose bitmaps each layer holds (libvirt copies them into each new overlay).
LAYERS = (("base.qcow2", 4), ("mid.qcow2", 7), ("top.qcow2", 10))
VIRTUAL_SIZE = "1G"


def spec(domains: int) -> str:
    return f"d{domains}x{len(DISKS)}-l{len(LAYERS)}-c{CHECKPOINTS}"


def _template(directory: Path) -> None:
    """One disk's chain: base <- mid <- top with their bitmaps and writes."""
    directory.mkdir(parents=True)
    below = None
    for i, (name, count) in enumerate(LAYERS):
        path = directory / name
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if below is not None:
            args += ["-b", below, "-F", "qcow2"]
        subprocess.run([*args, str(path), VIRTUAL_SIZE], check=True)
        for c in range(1, count + 1):
            subprocess.run(["qemu-img", "bitmap", "--add", str(path), f"cp{c}"], check=True)
        writes = [f"write -q -P {i + 1} {(i * 37 + k * 13) % 1000}M 256k" for k in range(8)]
        subprocess.run(
            ["qemu-io", "-f", "qcow2", str(path)],
            input="\n".join(writes) + "\n",
            text=True,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        below = name


def build_host(work: Path, domains: int = DOMAINS) -> Host:
    """The synthetic host, built once (its directory name carries the spec)."""
    root = work / f"checkpoints-host-{spec(domains)}"
    done = root / ".complete"
    host = Host(root)
    if done.exists():
        return host
    shutil.rmtree(root, ignore_errors=True)
    host = Host(root)
    template = root / "template"
    _template(template)
    for d in range(domains):
        name = f"vm{d:02d}"
        disks = []
        for target in DISKS:
            chain = host.images / name / target
            shutil.copytree(template, chain)
            disks.append(Disk(target, str(chain / LAYERS[-1][0])))
        host.define(name, disks)
        parent = None
        for c in range(1, CHECKPOINTS + 1):
            host.checkpoint(
                name, f"cp{c}", parent=parent, disks=tuple((t, "bitmap") for t in DISKS)
            )
            parent = f"cp{c}"
    shutil.rmtree(template)
    done.touch()
    return host


def top_images(host: Host) -> list[Path]:
    return sorted(host.images.glob(f"*/*/{LAYERS[-1][0]}"))


def _same_information(ours: dict, peer_outputs: dict[str, list[dict]], domains: int) -> str | None:
    """None when both saw the same layers, bitmaps and flags for every disk, else why not."""
    seen = 0
    for domain in ours["domains"]:
        for disk in domain["disks"]:
            layers = peer_outputs[disk["source"]]
            theirs = [
                (
                    layer["filename"],
                    sorted(
                        (b["name"], tuple(b["flags"]))
                        for b in layer.get("format-specific", {}).get("data", {}).get("bitmaps", [])
                    ),
                )
                for layer in layers
            ]
            mine = [
                (x["filename"], sorted((b["name"], tuple(b["flags"])) for b in x["bitmaps"]))
                for x in disk["backing_chain"]
            ]
            # qemu-img names lower layers by their resolved path; compare by file name.
            if [(Path(f).name, b) for f, b in mine] != [(Path(f).name, b) for f, b in theirs]:
                return f"{disk['source']}: qbitmap {mine} != qemu-img {theirs}"
            seen += 1
    if seen != domains * len(DISKS):
        return f"qbitmap reported {seen} disks, expected {domains * len(DISKS)}"
    return None


def _time_host(host: Host, domains: int, runs: int) -> dict:
    """Both tools on *host*, alternating: their walls, after checking they agree."""
    tops = top_images(host)
    ours_argv = common.qbitmap_argv("checkpoints", "--all", "--json", *host.args())
    loop = "; ".join(
        f"qemu-img info --backing-chain --output=json -U {shlex.quote(str(t))}" for t in tops
    )
    peer_argv = ["sh", "-c", loop]

    # Warm up, and make sure both gather the same facts.
    ours = json.loads(subprocess.run(ours_argv, capture_output=True, check=False).stdout)
    peer_outputs = {
        str(t): json.loads(
            subprocess.run(
                ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(t)],
                capture_output=True,
                check=True,
            ).stdout
        )
        for t in tops
    }
    problem = _same_information(ours, peer_outputs, domains)
    if ours["exit_code"] != 0 or problem is not None:
        raise SystemExit(
            f"bench_checkpoints: the two disagree or the host is not healthy: exit "
            f"{ours['exit_code']}; {problem}"
        )
    ours_runs, peer_runs = common.alternate(
        lambda: common.measure(ours_argv), lambda: common.measure(peer_argv), runs
    )
    return {
        "domains": domains,
        "disks": len(tops),
        "images": len(tops) * len(LAYERS),
        "ours_argv": ours_argv,
        "peer_argv": [
            "sh",
            "-c",
            f"qemu-img info --backing-chain --output=json -U TOP x {len(tops)}",
        ],
        "ours": ours_runs,
        "peer": peer_runs,
        "ours_wall": statistics.median(m.wall for m in ours_runs),
        "peer_wall": statistics.median(m.wall for m in peer_runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed rounds per side (default 9)")
    args = parser.parse_args()

    small_host = build_host(common.WORK_DIR, DOMAINS)
    large_host = build_host(common.WORK_DIR, LARGE_DOMAINS)
    common.compile_bytecode()
    small = _time_host(small_host, DOMAINS, args.runs)
    large = _time_host(large_host, LARGE_DOMAINS, args.runs)
    ours_wall, peer_wall = small["ours_wall"], small["peer_wall"]
    ratio = ours_wall / peer_wall
    interpreter = min((common.python_baseline() for _ in range(3)), key=lambda m: m.wall)
    imports = min(
        (
            common.measure(
                [sys.executable, "-c", "import qbitmap.cli, qbitmap.libvirt, qbitmap.check.chain"]
            )
            for _ in range(3)
        ),
        key=lambda m: m.wall,
    )
    images = small["images"]
    # The cost of one more disk (its chain of three images), and each tool's fixed cost.
    more_disks = large["disks"] - small["disks"]
    ours_per_disk = (large["ours_wall"] - ours_wall) / more_disks
    peer_per_disk = (large["peer_wall"] - peer_wall) / more_disks
    ours_fixed = ours_wall - ours_per_disk * small["disks"]
    peer_fixed = peer_wall - peer_per_disk * small["disks"]
    marginal_ratio = ours_per_disk / peer_per_disk
    # The number of disks from which qbitmap takes less time than qemu-img.
    crossover = (
        (ours_fixed - peer_fixed) / (peer_per_disk - ours_per_disk)
        if peer_per_disk > ours_per_disk
        else None
    )
    rows = []
    for result in (small, large):
        rows.append(
            [
                f"qbitmap checkpoints --all --json ({result['domains']} domains)",
                f"{result['ours_wall']:.3f}",
                f"{min(m.wall for m in result['ours']):.3f}",
                f"{max(m.maxrss_kib for m in result['ours']) / 1024:.1f}",
            ]
        )
        rows.append(
            [
                f"qemu-img info --backing-chain x {result['disks']}",
                f"{result['peer_wall']:.3f}",
                f"{min(m.wall for m in result['peer']):.3f}",
                f"{max(m.maxrss_kib for m in result['peer']) / 1024:.1f}",
            ]
        )
    print(
        f"checkpoints: {DOMAINS} (and {LARGE_DOMAINS}) domains x {len(DISKS)} disks x "
        f"{len(LAYERS)} layers x {CHECKPOINTS} checkpoints ({images} images), {args.runs} rounds"
    )
    common.print_table(["command", "median s", "best s", "max RSS MiB"], rows)
    print(
        f"ratio (median qbitmap / median qemu-img, {DOMAINS} domains): {ratio:.2f}  "
        f"(target <= 1.00: {'met' if ratio <= 1.0 else 'NOT met'})"
    )
    print(
        f"one more disk ({len(LAYERS)} images): qbitmap {1000 * ours_per_disk:.2f} ms, "
        f"qemu-img {1000 * peer_per_disk:.2f} ms, ratio {marginal_ratio:.2f}; fixed cost: "
        f"qbitmap {ours_fixed:.3f} s, qemu-img {peer_fixed:.3f} s"
        + (f"; qbitmap is the faster from {crossover:.0f} disks" if crossover is not None else "")
    )
    print(
        f"of qbitmap's time: bare interpreter {interpreter.wall:.3f} s, interpreter + imports "
        f"{imports.wall:.3f} s; per image {1000 * (ours_wall - imports.wall) / images:.2f} ms"
    )

    def side(result: dict, which: str) -> dict:
        runs = result[which]
        return {
            "argv": result[f"{which}_argv"],
            "median_wall": result[f"{which}_wall"],
            "walls": [m.wall for m in runs],
            "maxrss_kib": max(m.maxrss_kib for m in runs),
        }

    path = common.save_results(
        "checkpoints",
        {
            "benchmark": "checkpoints",
            "host": {
                "domains": DOMAINS,
                "disks_per_domain": len(DISKS),
                "layers": len(LAYERS),
                "checkpoints": CHECKPOINTS,
                "images": images,
                "bitmaps_per_layer": [count for _name, count in LAYERS],
                "virtual_size": VIRTUAL_SIZE,
            },
            "runs": args.runs,
            "qbitmap": side(small, "ours"),
            "peer": side(small, "peer"),
            "ratio": ratio,
            "ratio_target": 1.0,
            "ratio_met": ratio <= 1.0,
            "large_host": {
                "domains": LARGE_DOMAINS,
                "qbitmap": side(large, "ours"),
                "peer": side(large, "peer"),
                "ratio": large["ours_wall"] / large["peer_wall"],
            },
            "per_disk": {
                "qbitmap_s": ours_per_disk,
                "peer_s": peer_per_disk,
                "ratio": marginal_ratio,
                "qbitmap_fixed_s": ours_fixed,
                "peer_fixed_s": peer_fixed,
                "crossover_disks": crossover,
            },
            "startup": {"interpreter_wall": interpreter.wall, "imports_wall": imports.wall},
        },
    )
    print(f"saved {path.relative_to(common.REPO_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
