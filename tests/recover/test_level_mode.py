"""``qbitmap recover --mode level`` end to end, on records written by the Tracker.

The Tracker dies (a CrashingDisk crash at a chosen operation, power-failure
style, or a real child process killed with SIGKILL); then the real CLI
recovers the bitmap from its record.  Afterwards QEMU must accept the image,
serve a dirty bitmap that covers every write the Tracker accepted, and the
record (and autoclear bit 63 with the last one) must be gone.  A stale record
must be refused.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import qemu
from crashdisk import CrashingDisk, SimulatedCrash
from levels_helpers import covers, granules, level_recovery

from qbitmap.check.levels import assess
from qbitmap.format import Image, read_bits
from qbitmap.track import FlushPolicy, Tracker

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 2 * GiB
CHILD = Path(__file__).resolve().parents[1] / "track" / "tracker_child.py"


def recover(path: Path, *args: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "qbitmap", "recover", "--json", *args, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


def expected_level_recovery(path: Path) -> np.ndarray:
    """The spec's rule applied to the crashed image, computed before recover runs."""
    bits, how = level_recovery(path)
    assert how != "consistent"
    return bits


def bits_after(path: Path, name: bytes = b"b0") -> np.ndarray:
    with Image.open(path) as img:
        entry = next(e for e in img.read_directory().entries if e.name == name)
        assert not entry.in_use
        return read_bits(img, entry)


def assert_recovered(path: Path, accepted, expected: np.ndarray) -> None:
    assert (bits_after(path) == expected).all()
    rc, report = qemu.img_check(path)
    assert rc == 0, report
    assert qemu.img_bitmaps(path)["b0"]["flags"] == ["auto"]
    assert covers(qemu.nbd_dirty_extents(path, "b0"), granules(accepted, 65536, SIZE))
    with Image.open(path) as img:
        assert img.read_levels() is None
        assert not (img.header.autoclear_features or 0) >> 63


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = qemu.create_image(tmp_path_factory.mktemp("tpl") / "t.qcow2", SIZE)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(300 * MiB, 8 * KiB), (1500 * MiB, MiB)])  # some bits before
    return path


SCRIPT_RNG = random.Random(7)
SCRIPT = [
    (SCRIPT_RNG.randrange(0, 64) * 32 * MiB + SCRIPT_RNG.randrange(0, 512) * 4096, 4096)
    for _ in range(30)
]


def crash_run(path: Path, crash_at: int | None, *, level_bits: int = 6, lose: bool = True):
    """Track SCRIPT with a flush every 10 writes; crash at operation *crash_at*."""
    rng = random.Random(crash_at)
    disks = []

    def wrapper(inner):
        disks.append(CrashingDisk(inner, crash_at, lose_unflushed=lose, rng=rng))
        return disks[-1]

    accepted = []
    tracker = None
    try:
        tracker = Tracker.open(path, "b0", level_bits=level_bits, disk_wrapper=wrapper)
        for i, (off, length) in enumerate(SCRIPT):
            tracker.write(off, length)
            accepted.append((off, length))
            if i % 10 == 9:
                tracker.flush()
        if crash_at is None:
            return accepted, disks[0].ops, tracker
        tracker.close()
    except SimulatedCrash:
        pass
    finally:
        if tracker is not None and crash_at is not None:
            tracker.abandon()
    return accepted, None, None


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.65, 0.8, 0.9])
@pytest.mark.parametrize("level_bits", [2, 6])
def test_level_recovery_after_a_tracker_crash(template, tmp_path, fraction, level_bits):
    path = tmp_path / "img.qcow2"
    shutil.copyfile(template, path)
    _, total, tracker = crash_run(path, None, level_bits=level_bits)
    tracker.abandon()
    shutil.copyfile(template, path)
    # Crash points inside the run (after open, before close).
    accepted, _, _ = crash_run(path, int(total * fraction), level_bits=level_bits)
    expected = expected_level_recovery(path)
    rc, report, err = recover(path, "--mode", "level")
    assert rc == 0, err
    (b,) = report["bitmaps"]
    assert b["mode"] == "level"
    assert_recovered(path, accepted, expected)


def test_auto_picks_the_trusted_record_and_max_level_keeps_d_exact(template, tmp_path):
    path = tmp_path / "img.qcow2"
    shutil.copyfile(template, path)
    t = Tracker.open(path, "b0")
    for off, length in SCRIPT:
        t.write(off, length)
    t.flush()  # the record claims max_level: D is T
    truth = t.bits()
    t.abandon()
    rc, report, err = recover(path)
    assert rc == 0, err
    assert report["bitmaps"][0]["mode"] == "level"
    assert_recovered(path, SCRIPT, truth)
    # Nothing was widened: QEMU's dirty map is exactly the writes (and the old bits).
    old = [(300 * MiB, 8 * KiB), (1500 * MiB, MiB)]
    assert qemu.nbd_dirty_extents(path, "b0") == granules(SCRIPT + old, 65536, SIZE)


def test_a_stale_record_is_refused_and_nothing_changes(template, tmp_path):
    path = tmp_path / "img.qcow2"
    shutil.copyfile(template, path)
    t = Tracker.open(path, "b0")
    t.write(5 * MiB, 4096)
    t.abandon()
    qemu.qemu_io(path, "write 64M 4k")  # QEMU clears autoclear bit 63: the record is stale
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    rc, _, err = recover(path, "--mode", "level")
    assert rc == 1
    assert "stale" in err and "autoclear bit 63" in err
    rc, _, err = recover(path)  # auto: no trusted record and no reference
    assert rc == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    # Full recovery still works, and drops the stale record with the bitmap's in_use.
    rc, _, err = recover(path, "--mode", "full")
    assert rc == 0, err
    assert qemu.nbd_dirty_extents(path, "b0") == [(0, SIZE)]
    with Image.open(path) as img:
        assert img.read_levels() is None


def test_recovering_one_bitmap_keeps_the_others_record(tmp_path):
    path = qemu.create_image(tmp_path / "a.qcow2", SIZE)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1")
    for name, off in (("b0", 10 * MiB), ("b1", 900 * MiB)):
        t = Tracker.open(path, name, level_bits=4)
        t.write(off, 4096)
        t.abandon()
    rc, _, err = recover(path, "--mode", "level", "-b", "b0")
    assert rc == 0, err
    with Image.open(path) as img:
        entries = img.read_directory().entries
        a = assess(img, entries)
        assert [r.name for r in img.read_levels().records] == [b"b1"]
        assert img.header.autoclear_features >> 63
    assert a[b"b1"].trusted and a[b"b0"].status == "absent"
    assert covers(qemu.nbd_dirty_extents(path, "b0"), granules([(10 * MiB, 4096)], 65536, SIZE))
    rc, _, err = recover(path, "--mode", "level")
    assert rc == 0, err
    with Image.open(path) as img:
        assert img.read_levels() is None and not img.header.autoclear_features >> 63
    assert covers(qemu.nbd_dirty_extents(path, "b1"), granules([(900 * MiB, 4096)], 65536, SIZE))
    # The recovered bitmaps can be tracked again.
    with Tracker.open(path, "b1") as t:
        t.write(0, 1)
    assert covers(
        qemu.nbd_dirty_extents(path, "b1"), granules([(0, 1), (900 * MiB, 4096)], 65536, SIZE)
    )


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_level_recovery_after_sigkill(template, tmp_path, trial):
    path = tmp_path / "img.qcow2"
    log = tmp_path / "log"
    shutil.copyfile(template, path)
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(log), str(trial), str([2, 6][trial % 2]), "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().startswith("open")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0.02, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    accepted = [
        (int(a), int(b)) for a, b in (line.split() for line in log.read_text().splitlines()[1:])
    ]
    expected = expected_level_recovery(path)
    rc, _, err = recover(path, "--mode", "level")
    assert rc == 0, err
    assert_recovered(path, accepted, expected)


def test_flush_policy_tracker_is_recoverable_too(template, tmp_path):
    """A Tracker with a time policy, killed mid-way (abandoned), recovers like the others."""
    path = tmp_path / "img.qcow2"
    shutil.copyfile(template, path)
    clock = [0.0]
    t = Tracker.open(path, "b0", policy=FlushPolicy(idle_ms=50), clock=lambda: clock[0])
    for i, (off, length) in enumerate(SCRIPT):
        clock[0] = i * 0.03 + (0.2 if i % 7 == 0 else 0)
        t.tick()
        t.write(off, length)
    t.abandon()
    expected = expected_level_recovery(path)
    rc, _, err = recover(path, "--mode", "level")
    assert rc == 0, err
    assert_recovered(path, SCRIPT, expected)
