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
DISKS = ("vda", "vdb")
CHECKPOINTS = 10
# Checkpoints whose bitmaps each layer holds (libvirt copies them into each new overlay).
LAYERS = (("base.qcow2", 4), ("mid.qcow2", 7), ("top.qcow2", 10))
VIRTUAL_SIZE = "1G"
SPEC = f"d{DOMAINS}x{len(DISKS)}-l{len(LAYERS)}-c{CHECKPOINTS}"


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


def build_host(work: Path) -> Host:
    """The synthetic host, built once (its directory name carries the spec)."""
    root = work / f"checkpoints-host-{SPEC}"
    done = root / ".complete"
    host = Host(root)
    if done.exists():
        return host
    shutil.rmtree(root, ignore_errors=True)
    host = Host(root)
    template = root / "template"
    _template(template)
    for d in range(DOMAINS):
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


def _same_information(ours: dict, peer_outputs: dict[str, list[dict]]) -> str | None:
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
    if seen != DOMAINS * len(DISKS):
        return f"qbitmap reported {seen} disks, expected {DOMAINS * len(DISKS)}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed rounds per side (default 9)")
    args = parser.parse_args()

    host = build_host(common.WORK_DIR)
    tops = top_images(host)
    common.compile_bytecode()
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
    problem = _same_information(ours, peer_outputs)
    if ours["exit_code"] != 0 or problem is not None:
        print(
            f"bench_checkpoints: the two disagree or the host is not healthy: exit "
            f"{ours['exit_code']}; {problem}",
            file=sys.stderr,
        )
        return 1

    ours_runs, peer_runs = common.alternate(
        lambda: common.measure(ours_argv), lambda: common.measure(peer_argv), args.runs
    )
    ours_wall = statistics.median(m.wall for m in ours_runs)
    peer_wall = statistics.median(m.wall for m in peer_runs)
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
    images = len(tops) * len(LAYERS)
    rows = [
        [
            "qbitmap checkpoints --all --json",
            f"{ours_wall:.3f}",
            f"{min(m.wall for m in ours_runs):.3f}",
            f"{max(m.maxrss_kib for m in ours_runs) / 1024:.1f}",
        ],
        [
            f"qemu-img info --backing-chain x {len(tops)}",
            f"{peer_wall:.3f}",
            f"{min(m.wall for m in peer_runs):.3f}",
            f"{max(m.maxrss_kib for m in peer_runs) / 1024:.1f}",
        ],
    ]
    print(
        f"checkpoints: {DOMAINS} domains x {len(DISKS)} disks x {len(LAYERS)} layers x "
        f"{CHECKPOINTS} checkpoints ({images} images), {args.runs} rounds"
    )
    common.print_table(["command", "median s", "best s", "max RSS MiB"], rows)
    print(
        f"ratio (median qbitmap / median qemu-img): {ratio:.2f}  (target <= 1.00: "
        f"{'met' if ratio <= 1.0 else 'NOT met'})"
    )
    print(
        f"of qbitmap's time: bare interpreter {interpreter.wall:.3f} s, interpreter + imports "
        f"{imports.wall:.3f} s; per image {1000 * (ours_wall - imports.wall) / images:.2f} ms"
    )
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
            "qbitmap": {
                "argv": ours_argv,
                "median_wall": ours_wall,
                "walls": [m.wall for m in ours_runs],
                "maxrss_kib": max(m.maxrss_kib for m in ours_runs),
            },
            "peer": {
                "argv": [
                    "sh",
                    "-c",
                    f"qemu-img info --backing-chain --output=json -U TOP x {len(tops)}",
                ],
                "median_wall": peer_wall,
                "walls": [m.wall for m in peer_runs],
                "maxrss_kib": max(m.maxrss_kib for m in peer_runs),
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
