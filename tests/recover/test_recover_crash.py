"""Kill recover at every write and every flush; the image must stay sound and a rerun finish."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import qemu
from crashdisk import CrashingDisk, SimulatedCrash
from recover_helpers import CRASH_WRITES, STORED_WRITES, G, assert_qemu_accepts, covers, granules

from qbitmap.recover import Options, recover

WRITES = STORED_WRITES + CRASH_WRITES
NAMES = ("b0", "b1")


def _options(crashed, mode):
    if mode == "reference":
        return Options(mode="reference", reference=crashed.backup)
    return Options(mode="full")


def assert_invariant(image) -> dict[str, bool]:
    """qemu-img check: no corruption (leaks allowed); QEMU opens it; each bitmap in use or recovered."""
    rc, report = qemu.img_check(image)
    assert report.get("corruptions", 0) == 0 and rc in (0, 3), report
    bitmaps = qemu.img_bitmaps(image)
    state = {}
    for name in NAMES:
        in_use = "in-use" in bitmaps[name]["flags"]
        state[name] = in_use
        if not in_use:
            assert covers(qemu.nbd_dirty_extents(image, name), WRITES), name
    return state


def assert_rerun_finishes(image, options) -> None:
    report = recover(image, options)
    assert report.status in ("recovered", "leaks-reclaimed", "nothing-to-do")
    assert_qemu_accepts(image)
    for name in NAMES:
        assert covers(qemu.nbd_dirty_extents(image, name), WRITES)


def _count_ops(crashed, mode) -> int:
    probe = crashed.tmp / "probe.qcow2"
    shutil.copyfile(crashed.image, probe)
    holder = {}

    def wrap(d):
        holder["d"] = CrashingDisk(d, None)
        return holder["d"]

    recover(probe, _options(crashed, mode), disk_wrapper=wrap)
    return holder["d"].ops


@pytest.mark.parametrize("lose_unflushed", [False, True], ids=["kill", "power-loss"])
@pytest.mark.parametrize("mode", ["reference", "full"])
def test_crash_at_every_write_and_flush(crashed, mode, lose_unflushed):
    total = _count_ops(crashed, mode)
    assert total >= 10
    seen = set()
    for crash_at in range(total):
        image = crashed.tmp / "c.qcow2"
        shutil.copyfile(crashed.image, image)
        wrapper = lambda d, n=crash_at: CrashingDisk(
            d, n, lose_unflushed=lose_unflushed, rng=random.Random(n)
        )
        with pytest.raises(SimulatedCrash):
            recover(image, _options(crashed, mode), disk_wrapper=wrapper)
        state = assert_invariant(image)
        assert len(set(state.values())) == 1, f"one header write switches both bitmaps: {state}"
        seen.add(state["b0"])
        assert_rerun_finishes(image, _options(crashed, mode))
    assert seen == {True, False}, "crashes landed both before and after the commit"


def test_dry_run_and_rerun_after_recovery_have_nothing_to_do(crashed):
    recover(crashed.image, Options(mode="full"))
    again = recover(crashed.image, Options(mode="full"))
    assert again.status == "nothing-to-do" and again.leaked_clusters_reclaimed == 0


def _strace_kill(image, backup, syscall, n):
    argv = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        f"inject={syscall}:signal=SIGKILL:when={n}",
        sys.executable,
        "-m",
        "qbitmap",
        "recover",
        "--reference",
        str(backup),
        str(image),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _count_syscalls(image, backup) -> dict[str, int]:
    argv = [
        "strace",
        "-f",
        "-qq",
        "-c",
        "-o",
        str(image) + ".count",
        "-e",
        "trace=pwrite64,fsync",
        sys.executable,
        "-m",
        "qbitmap",
        "recover",
        "--reference",
        str(backup),
        str(image),
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    counts = {}
    for line in Path(str(image) + ".count").read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("pwrite64", "fsync"):
            counts[parts[-1]] = int(parts[3])
    return counts


def test_real_kills_with_strace(crashed):
    qemu.require_tools(
        "strace"
    )  # fails in CI when missing; scripts/install-test-deps.sh installs it
    probe = crashed.tmp / "probe.qcow2"
    shutil.copyfile(crashed.image, probe)
    counts = _count_syscalls(probe, crashed.backup)
    assert counts.get("pwrite64", 0) >= 5 and counts.get("fsync", 0) >= 3, counts
    plan = [
        ("pwrite64", n)
        for n in sorted({1, 2, counts["pwrite64"] // 2, counts["pwrite64"] - 1, counts["pwrite64"]})
    ]
    plan += [("fsync", n) for n in range(1, counts["fsync"] + 1)]
    states = set()
    for syscall, n in plan:
        image = crashed.tmp / "k.qcow2"
        shutil.copyfile(crashed.image, image)
        proc = _strace_kill(image, crashed.backup, syscall, n)
        assert proc.returncode != 0, (syscall, n, proc.stderr)
        states.add(assert_invariant(image)["b0"])
        assert_rerun_finishes(image, Options(mode="reference", reference=crashed.backup))
    assert states == {True, False}


def test_granules_helper_sanity():
    assert granules([(1, 1)], G) == [(0, G)]
