#!/usr/bin/env python3
"""Evaluation of the consistency-level scheme: metadata cost against recovery size.

For each workload (random 4 KiB, sequential 256 KiB, hot-spot 4 KiB) and each
flush policy, the real :class:`qbitmap.track.Tracker` tracks the same guest
writes on a real qcow2 image made by ``qemu-img`` (100 GiB, bitmap ``b0`` of
64 KiB granularity, ``level_bits`` 6, so levels of 16 GiB, 256 MiB, 4 MiB and
64 KiB).  Writes arrive in bursts (2,000 writes/s inside a burst, idle gaps
of 300 ms on average) on a simulated clock, which the Tracker gets as its
clock; the background flusher is simulated by calling ``tick()`` at the
instant ``next_deadline()`` names, so the run is deterministic.

Measured:

* extra metadata writes and flushes (fsyncs) on the image per 1,000 guest
  writes, between open and close (the fixed open/close cost is excluded);
* at random crash points, what a level recovery of the surviving image
  marks dirty, divided by the guest bytes truly written so far, beside a
  perfect bitmap (what ``T`` says, the same granularity) and a full recovery
  (the whole disk: what you get without a trusted record).

Crashes are simulated with a journaling Disk wrapper: every write the
Tracker issues is recorded, and the image a crash before guest write *k*
leaves is the original file plus the writes issued so far (the Tracker
flushes before ``write`` returns, so nothing is pending at those instants).
That image is then read back with qbitmap's own reader, judged with
``qbitmap.check.levels.assess`` and recovered with ``qbitmap.levels.recover``.  A
few crash points per run are cross-checked against a real crashing run
(``qbitmap.store.disk.CrashingDisk``) byte for byte, and every crash point is
checked to recover every accepted write (the run fails otherwise).

Writes docs/levels-evaluation.md (table), docs/levels-evaluation.png (plot,
matplotlib: the ``bench`` extra) and bench/results/levels_eval.json.
Run: ``python bench/levels_eval.py`` (also run by ``bench/run``).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The crash model the tests use (tests/crashdisk.py) stops the Tracker at every write.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common
from crashdisk import CrashingDisk, SimulatedCrash

from qbitmap import levels
from qbitmap.check.levels import assess
from qbitmap.format import Image, read_bits
from qbitmap.store.disk import Disk
from qbitmap.track import FlushPolicy, Tracker

KiB, MiB, GiB = common.KiB, common.MiB, common.GiB
DOCS = common.REPO_DIR / "docs"

VIRTUAL_SIZE = 100 * GiB
GRANULARITY = 64 * KiB
LEVEL_BITS = 6

POLICIES: list[tuple[str, FlushPolicy | None]] = [
    ("on close", None),
    ("every 10 s", FlushPolicy(every_seconds=10)),
    ("every 1 s", FlushPolicy(every_seconds=1)),
    ("4 KiB changed", FlushPolicy(changed_kib=4)),
    ("idle 100 ms", FlushPolicy(idle_ms=100)),
    ("2 s + 1 KiB + idle 500 ms", FlushPolicy(every_seconds=2, changed_kib=1, idle_ms=500)),
]
# The fan-out comparison: these policies again with other level_bits.
LEVEL_BITS_SWEEP = (3, 9)
SWEEP_POLICIES = ("every 1 s", "idle 100 ms")


# -- workloads ------------------------------------------------------------------------


def arrivals(n: int, rng: random.Random) -> list[float]:
    """Write times: bursts of ~100 writes 0.5 ms apart, idle gaps of ~300 ms."""
    out, t = [], 0.0
    while len(out) < n:
        for _ in range(max(1, int(rng.expovariate(1 / 100)))):
            out.append(t)
            t += 0.0005
        t += rng.expovariate(1 / 0.3)
    return out[:n]


def random_4k(n: int, rng: random.Random) -> list[tuple[int, int]]:
    return [(rng.randrange(VIRTUAL_SIZE // 4096) * 4096, 4096) for _ in range(n)]


def sequential(n: int, rng: random.Random) -> list[tuple[int, int]]:
    size, start = 256 * KiB, 10 * GiB
    return [((start + i * size) % VIRTUAL_SIZE, size) for i in range(n)]


def hot_spot(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """90 % of the writes in four hot 256 MiB regions (1 % of the disk), 10 % anywhere."""
    hot = [rng.randrange(VIRTUAL_SIZE // (256 * MiB)) * 256 * MiB for _ in range(4)]
    out = []
    for _ in range(n):
        if rng.random() < 0.9:
            out.append((rng.choice(hot) + rng.randrange(256 * MiB // 4096) * 4096, 4096))
        else:
            out.append((rng.randrange(VIRTUAL_SIZE // 4096) * 4096, 4096))
    return out


WORKLOADS = {"random 4K": random_4k, "sequential 256K": sequential, "hot-spot 4K": hot_spot}


# -- the journaling disk ----------------------------------------------------------------------


class JournalDisk:
    """Passes everything through (fsync skipped: a crash is simulated, not real) and records writes."""

    def __init__(self, inner: Disk) -> None:
        self.inner = inner
        self.writes: list[tuple[int, bytes]] = []
        self.flushes = 0

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self.flushes += 1

    def size(self) -> int:
        return self.inner.size()


class NoFsync(JournalDisk):
    """The same without keeping the data (for the cross-check runs)."""

    def pwrite(self, offset: int, data: bytes) -> None:
        self.inner.pwrite(offset, data)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Run:
    workload: str
    policy: str
    level_bits: int
    writes: int
    meta_writes: int  # pwrite calls between open and close
    meta_flushes: int
    level_updates: int
    bitmap_flushes: int
    ideal: list[float]  # per crash point: perfect-bitmap bytes / truly written bytes
    level: list[float]  # level recovery bytes / truly written bytes
    full: list[float]  # whole disk / truly written bytes
    c_at_crash: list[int]  # consistent_level of the record at each crash point

    def summary(self) -> dict[str, object]:
        per_k = 1000 / self.writes
        return {
            "workload": self.workload,
            "policy": self.policy,
            "level_bits": self.level_bits,
            "meta_writes_per_1000": self.meta_writes * per_k,
            "flushes_per_1000": self.meta_flushes * per_k,
            "level_updates_per_1000": self.level_updates * per_k,
            "bitmap_flushes": self.bitmap_flushes,
            "crash_points": len(self.level),
            "ideal_median": float(np.median(self.ideal)),
            "level_median": float(np.median(self.level)),
            "level_p90": float(np.percentile(self.level, 90)),
            "full_median": float(np.median(self.full)),
            "level_share_of_full_median": float(
                np.median(np.array(self.level) / np.array(self.full))
            ),
            "c_median": float(np.median(self.c_at_crash)),
        }


def track(image: Path, writes, times, policy, wrapper, position, level_bits: int):
    """Run the Tracker over *writes*; returns (tracker, position() before each write).

    The caller closes the tracker; on an exception (a simulated crash) it is
    abandoned here, which releases the image's locks and descriptor.
    """
    clock = Clock()
    tracker = Tracker.open(
        image, "b0", level_bits=level_bits, policy=policy, clock=clock, disk_wrapper=wrapper
    )
    marks: list[tuple[int, int]] = []
    try:
        for (off, length), t in zip(writes, times, strict=True):
            deadline = tracker.next_deadline()
            if deadline is not None and deadline <= t:
                clock.now = deadline  # where a background flusher would wake up
                tracker.tick()
            clock.now = t
            marks.append(position())
            tracker.write(off, length)
    except BaseException:
        tracker.abandon()
        raise
    return tracker, marks


def union_bytes(ranges: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, length in sorted(ranges):
        stop = start + length
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def recovered_bytes(path: Path, truth: np.ndarray) -> tuple[int, int]:
    """(bytes a level recovery of *path* marks dirty, the record's consistent_level)."""
    with Image.open(path) as img:
        entries = img.read_directory().entries
        entry = entries[0]
        a = assess(img, entries)[entry.name]
        if not (entry.in_use and a.trusted):
            raise AssertionError(
                f"crashed image: in_use={entry.in_use}, record {a.status} ({a.reason})"
            )
        bits = read_bits(img, entry)
    nbits = VIRTUAL_SIZE // GRANULARITY
    out = levels.recover(bits, nbits, a.consistent_level, a.max_level, a.level_bits)
    if (truth & ~out).any():
        raise AssertionError(f"{path}: level recovery lost a write")
    return int(np.unpackbits(out).sum()) * GRANULARITY, a.consistent_level


def crash_for_real(
    template: Path, work: Path, writes, times, policy, level_bits: int, crash_at: int
) -> bytes:
    """The image a run crashing at disk operation *crash_at* leaves (CrashingDisk)."""
    image = work / "real-crash.qcow2"
    shutil.copyfile(template, image)
    try:
        tracker, _ = track(
            image,
            writes,
            times,
            policy,
            lambda inner: CrashingDisk(NoFsync(inner), crash_at),
            lambda: (0, 0),
            level_bits,
        )
        tracker.close()  # no operation after the crash point before close: it crashes here
    except SimulatedCrash:
        return image.read_bytes()
    raise AssertionError(f"no crash at operation {crash_at}")


def evaluate(
    template: Path,
    work: Path,
    workload: str,
    policy_name: str,
    policy: FlushPolicy | None,
    *,
    n: int,
    points: int,
    seed: int,
    level_bits: int = LEVEL_BITS,
    cross_checks: int = 1,
) -> Run:
    writes = WORKLOADS[workload](n, random.Random(seed))
    times = arrivals(n, random.Random(seed + 1))
    image = work / "run.qcow2"
    shutil.copyfile(template, image)
    disks: list[JournalDisk] = []

    def wrapper(inner: Disk) -> Disk:
        disks.append(JournalDisk(inner))
        return disks[-1]

    def position() -> tuple[int, int]:
        return len(disks[0].writes), disks[0].flushes

    tracker, marks = track(image, writes, times, policy, wrapper, position, level_bits)
    journal = disks[0]
    marks.append(position())  # after the last write, before close
    stats = tracker.stats
    tracker.close()
    opened, last = marks[0], marks[-1]
    run = Run(
        workload,
        policy_name,
        level_bits,
        n,
        last[0] - opened[0],
        last[1] - opened[1],
        stats.level_updates,
        stats.flushes,
        [],
        [],
        [],
        [],
    )

    # Crash before guest write k, i.e. with k writes accepted (1 <= k <= n).
    picks = sorted(random.Random(seed + 2).sample(range(1, n + 1), points))
    checked = set(picks[len(picks) // 2 :: max(1, len(picks) // (2 * cross_checks))][:cross_checks])
    flat = np.zeros(VIRTUAL_SIZE // GRANULARITY, dtype=np.uint8)
    state = bytearray(template.read_bytes())
    accepted = applied = 0
    crashed = work / "crashed.qcow2"
    for k in picks:
        for off, length in writes[accepted:k]:
            flat[off // GRANULARITY : (off + length - 1) // GRANULARITY + 1] = 1
        accepted = k
        upto = marks[k][0]
        for off, data in journal.writes[applied:upto]:
            end = off + len(data)
            if end > len(state):
                state.extend(bytes(end - len(state)))
            state[off:end] = data
        applied = upto
        if k in checked and k < n:
            real = crash_for_real(template, work, writes, times, policy, level_bits, sum(marks[k]))
            if real != bytes(state):
                raise AssertionError(
                    f"{workload}/{policy_name}: replay differs from a real crash at k={k}"
                )
        crashed.write_bytes(state)
        level_bytes, c = recovered_bytes(crashed, np.packbits(flat, bitorder="little"))
        true_bytes = union_bytes(writes[:k])
        run.ideal.append(int(flat.sum()) * GRANULARITY / true_bytes)
        run.level.append(level_bytes / true_bytes)
        run.full.append(VIRTUAL_SIZE / true_bytes)
        run.c_at_crash.append(c)
    return run


def make_template(work: Path) -> Path:
    path = work / "template.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(VIRTUAL_SIZE)], check=True
    )
    subprocess.run(
        ["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), str(path), "b0"], check=True
    )
    return path


# -- reports ---------------------------------------------------------------------------------


def fmt_x(x: float) -> str:
    return f"{x:.3g}x" if x < 1000 else f"{x:,.0f}x"


def fmt_n(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


TABLE_HEADERS = (
    "workload",
    "flush policy",
    "metadata writes / 1000",
    "fsyncs / 1000",
    "record updates / 1000",
    "bitmap flushes",
    "perfect bitmap",
    "level recovery (median)",
    "level recovery (p90)",
    "full recovery (median)",
    "level / full (median)",
    "median c",
)


def table_rows(summaries: list[dict]) -> list[list[str]]:
    return [
        [
            s["workload"],
            s["policy"],
            fmt_n(s["meta_writes_per_1000"]),
            fmt_n(s["flushes_per_1000"]),
            fmt_n(s["level_updates_per_1000"]),
            str(s["bitmap_flushes"]),
            fmt_x(s["ideal_median"]),
            fmt_x(s["level_median"]),
            fmt_x(s["level_p90"]),
            fmt_x(s["full_median"]),
            f"{s['level_share_of_full_median']:.3f}",
            f"{s['c_median']:g} of {s['max_level']}",
        ]
        for s in summaries
    ]


def markdown_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def headline(main_runs: list[dict]) -> list[str]:
    """Sentences computed from the numbers, so the page never disagrees with its tables."""
    lines = []
    for workload in WORKLOADS:
        runs = [s for s in main_runs if s["workload"] == workload]
        on_close = next(s for s in runs if s["policy"] == "on close")
        full, ideal = fmt_x(on_close["full_median"]), fmt_x(on_close["ideal_median"])
        best = min(runs, key=lambda s: (s["level_median"], s["meta_writes_per_1000"]))
        if best["level_share_of_full_median"] > 0.95:
            costly = max(runs, key=lambda s: s["meta_writes_per_1000"])
            lines.append(
                f"* **{workload}**: no flush policy helps. Even {costly['policy']} "
                f"({fmt_n(costly['meta_writes_per_1000'])} metadata writes per 1,000 guest writes) "
                f"leaves the median level recovery at {fmt_x(costly['level_median'])} the truly "
                f"written bytes, {costly['level_share_of_full_median']:.0%} of a full recovery "
                f"({full}; a perfect bitmap: {ideal}): the record's level at the crash is "
                f"{costly['c_median']:g} of {costly['max_level']} in the median, and at that level "
                "nearly every group already has a bit set on disk."
            )
            continue
        cheap = min(
            (s for s in runs if s["level_median"] <= 2 * best["level_median"]),
            key=lambda s: s["meta_writes_per_1000"],
        )
        text = (
            f"* **{workload}**: flushing {best['policy']} costs "
            f"{fmt_n(best['meta_writes_per_1000'])} metadata writes "
            f"({fmt_n(best['flushes_per_1000'])} fsyncs) per 1,000 guest writes and gives a median "
            f"level recovery of {fmt_x(best['level_median'])} the truly written bytes "
            f"(p90 {fmt_x(best['level_p90'])}) against {full} for a full recovery "
            f"({ideal} for a perfect bitmap)"
        )
        if cheap is not best:
            text += (
                f"; {cheap['policy']} gets within 2x of that ({fmt_x(cheap['level_median'])}) with "
                f"{fmt_n(cheap['meta_writes_per_1000'])} writes per 1,000"
            )
        text += (
            f"; flushing only on close ({fmt_n(on_close['meta_writes_per_1000'])} per 1,000) "
            f"recovers {fmt_x(on_close['level_median'])}."
        )
        lines.append(text)
    return lines


def write_markdown(path: Path, main_runs: list[dict], sweep: list[dict], params: dict) -> None:
    text = f"""# Consistency levels: evaluation

Generated by `python bench/levels_eval.py` (also run by `bench/run`); do not
edit by hand. The numbers come from the real `qbitmap.track.Tracker` writing
a real qcow2 image made by `qemu-img`; see the script's docstring for the
method.

Setup: a {VIRTUAL_SIZE // GiB} GiB disk, bitmap granularity {GRANULARITY // KiB} KiB,
{params["writes"]:,} guest writes per run arriving in bursts (2,000 writes/s inside
a burst, idle gaps of 300 ms on average, on a simulated clock), the bitmap empty
at the start (as right after a backup). `level_bits` {LEVEL_BITS} (QEMU's fan-out of 64)
gives levels of 16 GiB, 256 MiB, 4 MiB and 64 KiB. Each run is crashed (simulated)
at {params["points"]} random points; at each, the surviving image is recovered with
the spec's rule.

Columns:

* *metadata writes / fsyncs / record updates per 1000*: what the Tracker wrote
  to the image (and flushed) per 1,000 guest writes, between open and close;
  record updates are the `consistent_level` rewrites of step 2 of the protocol;
* *perfect bitmap*, *level recovery*, *full recovery*: bytes marked dirty divided
  by the guest bytes truly written before the crash; a perfect bitmap is `T`
  itself (it only loses to the granularity), a full recovery marks the whole disk
  (what you get without a trusted record, and QEMU's only remedy);
* *level / full*: the fraction of a full backup that the level recovery still
  needs; *median c*: the record's `consistent_level` at the crash points.

## Headline

{chr(10).join(headline(main_runs))}

## Workloads and flush policies (level_bits {LEVEL_BITS})

{markdown_table(TABLE_HEADERS, table_rows(main_runs))}

## Fan-out: level_bits {", ".join(str(b) for b in LEVEL_BITS_SWEEP)} against {LEVEL_BITS}

{markdown_table(("level_bits", *TABLE_HEADERS), [[str(s["level_bits"]), *r] for s, r in zip(sweep, table_rows(sweep), strict=True)])}

![metadata writes against recovery size](levels-evaluation.png)
"""
    path.write_text(text)


def write_plot(path: Path, main_runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in POLICIES]
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    markers = dict(zip(names, "os^Dvp", strict=True))
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(15, 5), sharey=True)
    for ax, workload in zip(axes, WORKLOADS, strict=True):
        runs = [s for s in main_runs if s["workload"] == workload]
        for s in runs:
            x = s["meta_writes_per_1000"]
            ax.plot(
                [x, x],
                [s["level_median"], s["level_p90"]],
                color=colors[s["policy"]],
                lw=1,
                alpha=0.5,
            )
            ax.scatter(
                [x],
                [s["level_median"]],
                s=48,
                zorder=3,
                color=colors[s["policy"]],
                marker=markers[s["policy"]],
                label=s["policy"],
            )
        ax.axhline(runs[0]["full_median"], color="tab:red", ls="--", lw=1, label="full recovery")
        ax.axhline(
            runs[0]["ideal_median"], color="tab:green", ls=":", lw=1.2, label="perfect bitmap"
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(workload)
        ax.set_xlabel("metadata writes per 1,000 guest writes")
        ax.grid(True, which="both", alpha=0.2)
    axes[0].set_ylabel("bytes recovered / bytes truly written\n(median; line up to p90)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Level recovery after a crash against the Tracker's metadata writes (level_bits {LEVEL_BITS})"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20_000, help="guest writes per run")
    parser.add_argument("--points", type=int, default=60, help="crash points per run")
    parser.add_argument("--seed", type=int, default=2015)
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the table and plot go")
    parser.add_argument(
        "--no-plot", action="store_true", help="skip the plot (no matplotlib needed)"
    )
    parser.add_argument(
        "--no-save", action="store_true", help="do not write bench/results/levels_eval.json"
    )
    args = parser.parse_args()
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("levels_eval: matplotlib is missing: pip install -e '.[bench]'", file=sys.stderr)
            return 1
    started = time.monotonic()
    main_runs: list[dict] = []
    sweep: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qbitmap-levels-eval-") as tmp:
        work = Path(tmp)
        template = make_template(work)
        nbits = VIRTUAL_SIZE // GRANULARITY
        opts = {"n": args.writes, "points": args.points}
        for wi, workload in enumerate(WORKLOADS):
            seed = args.seed + 100 * wi  # the same writes for every policy of a workload
            for name, policy in POLICIES:
                run = evaluate(template, work, workload, name, policy, seed=seed, **opts).summary()
                run["max_level"] = levels.max_level(nbits, LEVEL_BITS)
                main_runs.append(run)
            for level_bits in LEVEL_BITS_SWEEP:
                for name, policy in POLICIES:
                    if name not in SWEEP_POLICIES:
                        continue
                    run = evaluate(
                        template,
                        work,
                        workload,
                        name,
                        policy,
                        seed=seed,
                        level_bits=level_bits,
                        **opts,
                    ).summary()
                    run["max_level"] = levels.max_level(nbits, level_bits)
                    sweep.append(run)
    sweep += [s for s in main_runs if s["policy"] in SWEEP_POLICIES]
    sweep.sort(key=lambda s: (list(WORKLOADS).index(s["workload"]), s["policy"], s["level_bits"]))
    params = {
        "writes": args.writes,
        "points": args.points,
        "seed": args.seed,
        "virtual_size": VIRTUAL_SIZE,
        "granularity": GRANULARITY,
        "level_bits": LEVEL_BITS,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    write_markdown(args.docs / "levels-evaluation.md", main_runs, sweep, params)
    if not args.no_plot:
        write_plot(args.docs / "levels-evaluation.png", main_runs)
    elapsed = time.monotonic() - started
    if not args.no_save:
        common.save_results(
            "levels_eval",
            {
                "parameters": params,
                "runs": main_runs,
                "level_bits_sweep": sweep,
                "seconds": elapsed,
            },
        )
    common.print_table(
        ("workload", "policy", "meta/1000", "level x", "full x", "level/full"),
        [
            (
                s["workload"],
                s["policy"],
                fmt_n(s["meta_writes_per_1000"]),
                fmt_x(s["level_median"]),
                fmt_x(s["full_median"]),
                f"{s['level_share_of_full_median']:.3f}",
            )
            for s in main_runs
        ],
    )
    print()
    print("\n".join(headline(main_runs)))
    runs = len(main_runs) + len(sweep) - len(SWEEP_POLICIES) * len(WORKLOADS)
    wrote = [args.docs / "levels-evaluation.md"]
    if not args.no_plot:
        wrote.append(args.docs / "levels-evaluation.png")
    print(f"\nlevels_eval: {runs} runs in {elapsed:.0f} s; wrote {', '.join(map(str, wrote))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
