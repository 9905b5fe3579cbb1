"""Crashes of the real Tracker on real images: recovery never loses an accepted write.

Two ways to die:

* in-process, thousands of times: the image's Disk is wrapped in
  ``crashdisk.CrashingDisk`` (tests/crashdisk.py), which stops at write-or-flush number N
  and (power-failure mode) drops the writes not yet flushed, or keeps a
  random subset of them;
* in a child process, tens of times: ``tracker_child.py`` tracks random
  writes and dies by ``os._exit`` at an exact operation or by the parent's
  SIGKILL at a random moment.

After the crash the image is read back with qbitmap's reader: a bitmap in
use must carry a trusted record, and the spec's recovery rule applied to the
on-disk bits must cover every write whose ``Tracker.write`` returned.
"""

from __future__ import annotations

import os
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
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from levels_helpers import FakeClock, level_recovery

from qbitmap.check.levels import assess
from qbitmap.format import Image, read_bits
from qbitmap.track import FlushPolicy, Tracker
from qbitmap.track.state import bit_range

KiB, MiB, GiB = 1024, 1 << 20, 1 << 30
CHILD = Path(__file__).resolve().parent / "tracker_child.py"


class NoFsync:
    """Passes writes through but skips fsync: CrashingDisk models what a crash loses."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self.inner.size()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Small images made by QEMU: (virtual size, cluster size, granularity) vary."""
    qemu.require_tools("qemu-img", "qemu-io")
    root = tmp_path_factory.mktemp("templates")
    out = {}
    # 512-byte clusters: the 2 KiB bitmap spans 4 data clusters, and new
    # clusters need new refcount blocks now and then.
    p = qemu.create_image(root / "small-empty.qcow2", 64 * MiB, cluster_size=512)
    qemu.add_bitmap(p, "b0", granularity=4096)
    out["small-empty"] = p
    p = qemu.create_image(root / "small-full.qcow2", 64 * MiB, cluster_size=512)
    qemu.add_bitmap(p, "b0", granularity=4096)
    qemu.qemu_io_write(p, [(0, 8 * KiB), (20 * MiB, 3 * MiB), (63 * MiB, MiB)])
    out["small-full"] = p
    p = qemu.create_image(root / "big.qcow2", 4 * GiB)
    qemu.add_bitmap(p, "b0")
    qemu.qemu_io_write(p, [(GiB, 4 * KiB)])
    out["big"] = p
    return out


def accepted_bits(path: Path, writes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(bits before the tracker ran, those plus every accepted write) for bitmap b0."""
    with Image.open(path) as img:
        entry = next(e for e in img.read_directory().entries if e.name == b"b0")
        base = read_bits(img, entry)
        flat = np.unpackbits(base, bitorder="little")
        for off, length in writes:
            first, end = bit_range(off, length, entry.granularity, img.virtual_size)
            flat[first:end] = 1
        return base, np.packbits(flat, bitorder="little")


def assert_covered(required: np.ndarray, recovered: np.ndarray, how: str) -> None:
    lost = int(np.unpackbits(required & ~recovered, bitorder="little").sum())
    assert lost == 0, f"{how}: recovery lost {lost} bits"


def run_crashing(path: Path, script, crash_at, *, level_bits, policy, lose, seed):
    """Run *script* on a Tracker whose disk dies at operation *crash_at*; returns accepted writes."""
    rng = random.Random(seed) if lose else None
    disks: list[CrashingDisk] = []

    def wrapper(inner):
        disks.append(CrashingDisk(NoFsync(inner), crash_at, lose_unflushed=lose, rng=rng))
        return disks[-1]

    accepted: list[tuple[int, int]] = []
    clock = FakeClock()
    tracker = None
    crashed = False
    try:
        tracker = Tracker.open(
            path, "b0", level_bits=level_bits, policy=policy, clock=clock, disk_wrapper=wrapper
        )
        for step in script:
            if step[0] == "write":
                tracker.write(step[1], step[2])
                accepted.append((step[1], step[2]))
            elif step[0] == "flush":
                tracker.flush()
            else:
                clock.now += step[1]
                tracker.tick()
        tracker.close()
    except SimulatedCrash:
        crashed = True
    finally:
        if tracker is not None:
            tracker.abandon()
    return accepted, crashed, disks[0].ops if disks else 0


@st.composite
def crash_scenarios(draw):
    template = draw(st.sampled_from(["small-empty", "small-full", "big"]), label="template")
    size = 4 * GiB if template == "big" else 64 * MiB
    level_bits = draw(st.integers(1, 6), label="level_bits")
    script = []
    for _ in range(draw(st.integers(0, 25), label="nb_steps")):
        kind = draw(st.sampled_from(["write"] * 6 + ["flush", "sleep"]))
        if kind == "write":
            # Clustered offsets so that coarse groups are revisited.
            region = draw(st.integers(0, 7)) * (size // 8)
            offset = region + draw(st.integers(0, 255)) * 4096 + draw(st.sampled_from([0, 1, 511]))
            length = draw(st.sampled_from([1, 512, 4096, 65536, 1 << 20]))
            script.append(("write", offset, min(length, size - offset)))
        elif kind == "flush":
            script.append(("flush",))
        else:
            script.append(("sleep", draw(st.sampled_from([0.001, 0.5, 2.0]))))
    policy = draw(
        st.sampled_from(
            [None, FlushPolicy(changed_kib=0.0625), FlushPolicy(every_seconds=1, idle_ms=100)]
        ),
        label="policy",
    )
    where = draw(st.floats(0, 1, exclude_max=True), label="crash point (fraction of the run)")
    lose = draw(st.booleans(), label="lose_unflushed")
    seed = draw(st.integers(0, 2**32), label="seed")
    return template, level_bits, script, policy, where, lose, seed


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(scenario=crash_scenarios())
def test_fault_injection_fuzz(templates, tmp_path, scenario):
    """One clean run (counting operations), then the same run crashing at a random one of them."""
    template, level_bits, script, policy, where, lose, seed = scenario
    path = tmp_path / "img.qcow2"
    shutil.copyfile(templates[template], path)
    base, _ = accepted_bits(path, [])
    options = {"level_bits": level_bits, "policy": policy, "lose": lose, "seed": seed}
    accepted, crashed, total = run_crashing(path, script, None, **options)
    assert not crashed
    recovered, how = level_recovery(path)
    assert how == "consistent"
    assert (recovered == _required(templates[template], accepted)).all()

    shutil.copyfile(templates[template], path)
    crash_at = int(where * total)
    accepted, crashed, _ = run_crashing(path, script, crash_at, **options)
    assert crashed
    recovered, how = level_recovery(path)
    event(f"recovered as: {how.split('/')[0]}")
    assert_covered(base, recovered, how)
    assert_covered(_required(templates[template], accepted), recovered, how)


def _required(template: Path, accepted: list[tuple[int, int]]) -> np.ndarray:
    return accepted_bits(template, accepted)[1]


SCRIPT = [
    ("write", 1 * MiB, 4096),  # X = 0 on the empty bitmap: c = -1
    ("flush",),
    ("write", 1 * MiB + 4096, 4096),  # X = max_level = c
    ("write", 1 * MiB + 64 * KiB, 4096),
    ("write", 40 * MiB, 4096),
    ("flush",),
    ("write", 41 * MiB, 3 * MiB),
    ("write", 10 * MiB, 512),
]


@pytest.mark.parametrize("lose", [False, True])
def test_every_crash_point_then_qemu_check(templates, tmp_path, lose):
    """Each write and flush of one script as the crash point; QEMU finds no corruption."""
    path = tmp_path / "img.qcow2"
    shutil.copyfile(templates["small-empty"], path)
    _, crashed, total = run_crashing(
        path, SCRIPT, None, level_bits=2, policy=None, lose=False, seed=0
    )
    assert not crashed
    assert total > 30
    levels_seen = set()
    for n in range(total):
        shutil.copyfile(templates["small-empty"], path)
        accepted, crashed, _ = run_crashing(
            path, SCRIPT, n, level_bits=2, policy=None, lose=lose, seed=n
        )
        assert crashed
        recovered, how = level_recovery(path)
        levels_seen.add(how)
        assert_covered(_required(templates["small-empty"], accepted), recovered, how)
        rc, report = qemu.img_check(path)
        assert rc in (0, 3), (n, report)  # leaked clusters at worst
    # The sweep went through consistent bitmaps and records at several levels.
    assert "consistent" in levels_seen
    assert {"level -1/6", "level 0/6", "level 5/6", "level 6/6"} <= levels_seen, levels_seen


def test_qemu_write_makes_the_record_stale(templates, tmp_path):
    path = tmp_path / "img.qcow2"
    shutil.copyfile(templates["small-full"], path)
    tracker = Tracker.open(path, "b0")
    tracker.write(5 * MiB, 4096)
    tracker.abandon()
    with Image.open(path) as img:
        a = assess(img, img.read_directory().entries)[b"b0"]
    assert a.trusted
    qemu.qemu_io(path, "write 0 4k")  # QEMU's read-write open clears autoclear bit 63
    assert not qemu.read_autoclear(path) & (1 << 63)
    with Image.open(path) as img:
        a = assess(img, img.read_directory().entries)[b"b0"]
    assert a.status == "stale" and "autoclear bit 63" in a.reason
    # The extension itself is still there: QEMU keeps unknown extensions.
    assert any(m == 0x71626C76 for _, m, _ in qemu.header_extensions(path))


# -- real processes ---------------------------------------------------------------------


def _read_log(log: Path) -> tuple[bool, list[tuple[int, int]]]:
    opened, writes = False, []
    for line in log.read_text().splitlines():
        if line == "open":
            opened = True
        elif line:
            off, length = line.split()
            writes.append((int(off), int(length)))
    return opened, writes


def _child(path: Path, log: Path, seed: int, level_bits: int, exit_at: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(log), str(seed), str(level_bits), str(exit_at)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(24))
def test_real_process_crash(templates, tmp_path, trial):
    rng = random.Random(1000 + trial)
    template = ["small-empty", "small-full", "big"][trial % 3]
    path = tmp_path / "img.qcow2"
    log = tmp_path / "log"
    shutil.copyfile(templates[template], path)
    level_bits = rng.choice([1, 2, 3, 6])
    if trial % 2 == 0:
        # Die at an exact protocol step.
        proc = _child(path, log, trial, level_bits, rng.randrange(0, 200))
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode in (17, -signal.SIGKILL), proc.stderr.read().decode()
    else:
        proc = _child(path, log, trial, level_bits, -1)
        deadline = time.monotonic() + 60
        while (
            not (log.exists() and log.read_text().startswith("open"))
            and time.monotonic() < deadline
        ):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()
    opened, writes = _read_log(log) if log.exists() else (False, [])
    recovered, how = level_recovery(path)
    assert_covered(_required(templates[template], writes), recovered, how)
    if opened:
        assert how != "consistent"  # the child never closes: in_use stays set
    assert qemu.lock_bytes_held(path) == set()  # the kernel dropped the dead writer's locks
    rc, report = qemu.img_check(path)
    assert rc in (0, 3), report
