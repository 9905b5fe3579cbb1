"""What ``qbitmap check`` reports about records the Tracker wrote, against hand-computed numbers.

An 8 GiB disk with a 64 KiB-granularity bitmap has 131,072 bits; with
level_bits 6 (fan-out 64) max_level is 2, and one bit of levels 0, 1 and 2
covers 256 MiB, 4 MiB and 64 KiB.  Each scenario writes, flushes, writes
some more and then stops without closing (``abandon``: the Tracker's state
after a crash), so the record is trusted at a known level.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import qemu

from qbitmap.track import Tracker

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def check_json(path) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "qbitmap", "check", "--json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def levels_of(report: dict, name: str = "b0") -> dict:
    return next(b for b in report["bitmaps"] if b["name"] == name)["levels"]


@pytest.fixture
def image(tmp_path):
    path = qemu.create_image(tmp_path / "a.qcow2", 8 * GiB)
    qemu.add_bitmap(path, "b0")
    return path


@pytest.mark.parametrize(
    ("after_flush", "level", "granularity", "dirty"),
    [
        ([], 2, 64 * KiB, 64 * KiB),  # nothing new since the flush: D is exact
        ([GiB + 64 * KiB], 1, 4 * MiB, 4 * MiB),  # new bit in a set 4 MiB group: X = 2 = c
        ([GiB + 8 * MiB], 0, 256 * MiB, 256 * MiB),  # new 4 MiB group: X = 1
        ([GiB + 64 * KiB, 5 * GiB], -1, 8 * GiB, 8 * GiB),  # new 256 MiB group: X = 0
    ],
)
def test_check_reports_the_trackers_record(image, after_flush, level, granularity, dirty):
    t = Tracker.open(image, "b0")
    t.write(GiB, 4096)
    t.flush()
    for offset in after_flush:
        t.write(offset, 4096)
    assert t.consistent_level == level
    t.abandon()
    rc, report = check_json(image)
    assert rc == 4  # in use, metadata sound
    lv = levels_of(report)
    assert lv["status"] == "trusted"
    assert (lv["consistent_level"], lv["max_level"], lv["level_bits"]) == (level, 2, 6)
    assert lv["recovery_granularity"] == granularity
    assert lv["recovery_dirty_bytes"] == dirty
    assert lv["on_disk_dirty_bytes"] == 64 * KiB  # only the flushed write is in D
    codes = [f["code"] for f in report["findings"]]
    assert "bitmap-in-use" in codes and "levels-record-stale" not in codes


def test_check_reports_absent_after_a_clean_close_and_stale_after_qemu(image):
    with Tracker.open(image, "b0") as t:
        t.write(0, 1)
    rc, report = check_json(image)
    assert rc == 0
    assert levels_of(report) == {"status": "absent"}
    t = Tracker.open(image, "b0", level_bits=3)
    t.write(3 * GiB, 1)
    t.abandon()
    assert levels_of(check_json(image)[1])["status"] == "trusted"
    qemu.qemu_io(image, "write 0 4k")  # a read-write open by QEMU clears bit 63
    rc, report = check_json(image)
    lv = levels_of(report)
    assert lv["status"] == "stale" and "autoclear bit 63" in lv["reason"]
    assert lv["recovery_dirty_bytes"] is None
    assert "levels-record-stale" in [f["code"] for f in report["findings"]]
