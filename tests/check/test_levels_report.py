"""Consistency-level records in the check report: trusted, stale, absent, and recovery costs.

The base image's bitmap b0 (64 KiB granularity over 100 MiB: 1600 bits) has
bits set for the writes of ``corrupt.make_base``: guest MiB 0 (bits 0-15),
2 (bit 32), 3 (bit 48), 50 (bit 800) and 99 (bit 1584).  With level_bits 6
the fan-out is 64, so max_level is 1 and level 0 has one bit per 64 bitmap
bits (4 MiB of disk).
"""

from __future__ import annotations

import shutil

import corrupt
import pytest
import qemu
from checkrun import run_check

from qbitmap.check import check_image
from qbitmap.format import Image

MiB = 1024 * 1024
KiB = 1024
LEVELS_AUTOCLEAR = 1 << 63


def _with_record(
    base_image,
    tmp_path,
    *,
    level,
    max_level=1,
    level_bits=6,
    in_use=True,
    bit63=True,
    table_offset=None,
):
    img = tmp_path / "x.qcow2"
    if in_use:
        corrupt.apply(base_image, img, "in-use")
    else:
        shutil.copyfile(base_image, img)
    lay = corrupt.layout(img)
    entry = lay.entry("b0")
    data = corrupt._levels_ext(
        [
            (
                entry.table_offset if table_offset is None else table_offset,
                level,
                level_bits,
                max_level,
                16,
                b"b0",
            )
        ]
    )
    qemu.append_header_extension(img, corrupt.LEVELS_EXT, data)
    if bit63:
        qemu.set_autoclear_bits(img, LEVELS_AUTOCLEAR)
    return img


def _levels(run, name="b0"):
    return next(b for b in run.json["bitmaps"] if b["name"] == name)["levels"]


# on-disk dirty bits of b0: 16 + 4 bits of 64 KiB
ON_DISK = 20 * 64 * KiB


@pytest.mark.parametrize(
    ("level", "granularity", "dirty"),
    [
        (1, 64 * KiB, ON_DISK),  # level == max_level: the on-disk bitmap as it is
        (0, 4 * MiB, 3 * 4 * MiB),  # groups 0, 12 and 24 of 64 bits hold set bits
        (-1, 100 * MiB, 100 * MiB),  # nothing known: the whole disk
    ],
)
def test_trusted_record(level, granularity, dirty, base_image, tmp_path):
    img = _with_record(base_image, tmp_path, level=level)
    run = run_check("--json", img)
    assert run.exit_code == 4
    levels = _levels(run)
    assert levels["status"] == "trusted"
    assert levels["consistent_level"] == level
    assert levels["max_level"] == 1
    assert levels["level_bits"] == 6
    assert levels["recovery_granularity"] == granularity
    assert levels["recovery_dirty_bytes"] == dirty
    assert levels["on_disk_dirty_bytes"] == ON_DISK
    assert _levels(run, "b1") == {"status": "absent"}
    msg = next(f for f in run.json["findings"] if f["code"] == "bitmap-in-use")["message"]
    assert "--mode level" in msg and f"level {level} of 1" in msg
    assert "levels-record-stale" not in run.codes()


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"bit63": False}, "autoclear bit 63 is clear"),
        ({"in_use": False}, "not in use"),
        ({"max_level": 2}, "max_level is 2"),
        ({"level": 2}, "outside -1..1"),
        ({"level_bits": 17}, "level_bits 17"),
        ({"table_offset": 0x7770000}, "written for the bitmap table at 0x7770000"),
    ],
)
def test_stale_record(kwargs, reason, base_image, tmp_path):
    kwargs.setdefault("level", 0)
    img = _with_record(base_image, tmp_path, **kwargs)
    run = run_check("--json", img)
    levels = _levels(run)
    assert levels["status"] == "stale"
    assert reason in levels["reason"]
    assert levels["recovery_dirty_bytes"] is None
    stale = next(f for f in run.json["findings"] if f["code"] == "levels-record-stale")
    assert stale["severity"] == "info" and stale["bitmap"] == "b0"
    assert run.exit_code == (4 if kwargs.get("in_use", True) else 0)
    if kwargs.get("in_use", True):
        msg = next(f for f in run.json["findings"] if f["code"] == "bitmap-in-use")["message"]
        assert "--mode level" not in msg and "stale" in msg


def test_no_estimate_for_a_corrupt_bitmap(base_image, tmp_path):
    img = _with_record(base_image, tmp_path, level=0)
    lay = corrupt.layout(img)
    corrupt.poke(img, lay.entry("b0").table_offset, ">Q", lay.l2_offset)  # data on the L2 table
    run = run_check("--json", img)
    assert run.exit_code == 2
    assert _levels(run)["status"] == "trusted"
    assert _levels(run)["recovery_dirty_bytes"] is None


def test_library_report_carries_assessment(base_image, tmp_path):
    img = _with_record(base_image, tmp_path, level=0)
    with Image.open(img) as image:
        report = check_image(image, held_locks=())
    b0 = next(b for b in report.bitmaps if b.name == "b0")
    assert b0.levels is not None and b0.levels.trusted
    assert b0.recovery is not None and b0.recovery.dirty_bytes == 12 * MiB
