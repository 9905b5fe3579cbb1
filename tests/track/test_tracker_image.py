"""The Tracker on real qcow2 images made by QEMU, checked by QEMU afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import qemu
from levels_helpers import granules

from qbitmap import levels
from qbitmap.check.levels import assess
from qbitmap.errors import ImageBusyError, RefusedError, UsageError
from qbitmap.format import AutoclearFeature, Image, layout, read_bits
from qbitmap.track import FlushPolicy, Tracker

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
BIT63 = 1 << 63
WRITER = {100, 101, 103, 201, 203}


@pytest.fixture(autouse=True)
def _tools():
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


def state_of(path, name="b0"):
    """(entry, assessment, autoclear, levels extension) as qbitmap reads them."""
    with Image.open(path) as img:
        entries = img.read_directory().entries
        entry = next(e for e in entries if e.display_name == name)
        return (
            entry,
            assess(img, entries)[entry.name],
            img.header.autoclear,
            img.read_levels(),
        )


def image(
    tmp_path, size=8 * GiB, *, cluster_size=65536, granularity=None, names=("b0",), name="a.qcow2"
):
    path = qemu.create_image(tmp_path / name, size, cluster_size=cluster_size)
    for n in names:
        qemu.add_bitmap(path, n, granularity=granularity)
    return path


def test_open_write_close_leaves_a_consistent_bitmap_qemu_reads(tmp_path):
    path = image(tmp_path)
    writes = [(10 * MiB, 4 * KiB), (3 * GiB, MiB), (8 * GiB - 512, 512), (65536 * 7 + 1, 65536)]
    with Tracker.open(path, "b0") as t:
        nbits = (8 * GiB) // 65536
        assert t.max_level == levels.max_level(nbits, 6) == 2
        assert t.consistent_level == 2
        entry, a, autoclear, ext = state_of(path)
        assert entry.in_use
        assert a.trusted and a.consistent_level == 2 and a.max_level == 2 and a.level_bits == 6
        assert autoclear & AutoclearFeature.QBITMAP_LEVELS and autoclear & AutoclearFeature.BITMAPS
        (record,) = ext.records
        assert (record.bitmap_table_offset, record.granularity_bits) == (
            entry.bitmap_table_offset,
            16,
        )
        assert WRITER <= qemu.lock_bytes_held(path)
        for off, length in writes:
            t.write(off, length)
        assert t.consistent_level == -1  # the first write hit an untouched level-0 group
        assert state_of(path)[1].consistent_level == -1
    assert qemu.lock_bytes_held(path) == set()
    entry, a, autoclear, ext = state_of(path)
    assert not entry.in_use and a.status == "absent" and ext is None
    assert not autoclear & BIT63
    assert qemu.img_bitmaps(path)["b0"]["flags"] == ["auto"]
    assert qemu.img_check(path)[0] == 0
    assert qemu.nbd_dirty_extents(path, "b0") == granules(writes, 65536, 8 * GiB)


def test_flush_restores_max_level_and_data_reaches_disk(tmp_path):
    path = image(tmp_path)
    t = Tracker.open(path, "b0")
    try:
        t.write(5 * GiB, 4 * KiB)
        assert t.consistent_level == -1
        t.flush()
        assert t.consistent_level == t.max_level
        entry, a, _, _ = state_of(path)
        assert a.consistent_level == t.max_level
        with Image.open(path) as img:
            bits = read_bits(img, entry)
        assert (bits == t.bits()).all()
        # A write into the same 4 MiB level-1 group but a new bit: X = 2 = c.
        t.write(5 * GiB + 64 * KiB, 1)
        assert t.consistent_level == 1
        # Same bit again: nothing changes.
        t.write(5 * GiB + 64 * KiB + 100, 1)
        assert t.consistent_level == 1
    finally:
        t.close()
    assert qemu.img_check(path)[0] == 0


def test_prepopulated_bitmap_is_updated_in_place_and_small_clusters_allocate(tmp_path):
    # 512-byte clusters, 4 KiB granularity: the bitmap of 64 MiB has 2 KiB of
    # data, 4 data clusters; QEMU writes some, the Tracker adds the others.
    size = 64 * MiB
    path = image(tmp_path, size, cluster_size=512, granularity=4096)
    before = [(0, 4096), (9 * MiB, 12 * KiB)]
    qemu.qemu_io_write(path, before)
    rng = np.random.default_rng(5)
    writes = [
        (int(o) * 512, int(n) * 512)
        for o, n in zip(rng.integers(0, size // 512 - 64, 200), rng.integers(1, 64, 200))
    ]
    with Tracker.open(path, "b0", level_bits=2, policy=FlushPolicy(changed_kib=0.125)) as t:
        for off, length in writes:
            t.write(off, length)
        assert t.stats.flushes > 1
    assert qemu.img_check(path)[0] == 0
    assert qemu.nbd_dirty_extents(path, "b0") == granules(before + writes, 4096, size)


@pytest.mark.parametrize("level_bits", [1, 3, 16])
def test_level_bits_variants(tmp_path, level_bits):
    path = image(tmp_path, 2 * GiB)
    writes = [(i * 37 * MiB, 4096) for i in range(50)]
    with Tracker.open(path, "b0", level_bits=level_bits) as t:
        assert t.max_level == levels.max_level(2 * GiB // 65536, level_bits)
        for off, length in writes:
            t.write(off, length)
        a = state_of(path)[1]
        assert a.trusted and a.level_bits == level_bits and a.max_level == t.max_level
    assert qemu.nbd_dirty_extents(path, "b0") == granules(writes, 65536, 2 * GiB)


def test_dump_shows_the_record_while_tracking(tmp_path):
    path = image(tmp_path)
    with Tracker.open(path, "b0", level_bits=4) as t:
        t.write(0, 1)
        out = subprocess.run(
            [sys.executable, "-m", "qbitmap", "dump", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        info = json.loads(out.stdout)
        (ext,) = [e for e in info["extensions"] if e["magic"] == f"{layout.EXT_LEVELS:#010x}"]
        (rec,) = ext["records"]
        assert rec["name"] == "b0" and rec["level_bits"] == 4
        assert rec["consistent_level"] == t.consistent_level == -1
        assert rec["max_level"] == t.max_level
        assert "qbitmap consistency levels" in info["features"]["autoclear"]


def test_refusals(tmp_path):
    path = image(tmp_path, GiB)
    with pytest.raises(UsageError, match="no bitmap named 'nope'"):
        Tracker.open(path, "nope")
    with pytest.raises(UsageError, match="level_bits"):
        Tracker.open(path, "b0", level_bits=17)
    with Tracker.open(path, "b0"):
        with pytest.raises(ImageBusyError):
            Tracker.open(path, "b0")
        proc = qemu.qemu_img("bitmap", "--add", path, "bx", check=False)
        assert proc.returncode != 0 and "lock" in proc.stderr
    # A bitmap QEMU left in use (crash) is stale: recover it first.
    qemu.crash_image(path, [(0, 4096)])
    with pytest.raises(RefusedError, match="in use"):
        Tracker.open(path, "b0")
    assert qemu.lock_bytes_held(path) == set()


def test_write_outside_the_disk_is_rejected(tmp_path):
    path = image(tmp_path, GiB)
    with Tracker.open(path, "b0") as t:
        with pytest.raises(ValueError, match="outside the disk"):
            t.write(GiB - 1, 2)
        t.write(GiB - 1, 1)


def test_records_of_other_bitmaps_survive_while_bit_63_is_set(tmp_path):
    path = image(tmp_path, GiB, names=("b0", "b1"))
    t0 = Tracker.open(path, "b0")
    t0.write(0, 1)
    t0.abandon()  # b0 stays in use with a trusted record, as after a crash
    assert state_of(path, "b0")[1].trusted
    with Tracker.open(path, "b1") as t1:
        t1.write(MiB, 1)
        assert state_of(path, "b0")[1].trusted
        assert state_of(path, "b1")[1].trusted
    _, a0, autoclear, ext = state_of(path, "b0")
    assert a0.trusted and autoclear & BIT63
    assert [r.name for r in ext.records] == [b"b0"]


def test_stale_records_are_dropped_not_revived(tmp_path):
    path = image(tmp_path, GiB, names=("b0", "b1"))
    t0 = Tracker.open(path, "b0")
    t0.write(0, 1)
    t0.abandon()
    # QEMU opens the image read-write: it clears bit 63, the record is stale.
    qemu.qemu_io(path, "write 0 4k")
    a0 = state_of(path, "b0")[1]
    assert a0.status == "stale" and "bit 63" in a0.reason
    with Tracker.open(path, "b1") as t1:
        # Setting bit 63 for b1 must not make b0's old record trusted again.
        t1.write(MiB, 1)
        assert state_of(path, "b0")[1].status == "absent"
        assert state_of(path, "b1")[1].trusted
    _, _, autoclear, ext = state_of(path, "b1")
    assert ext is None and not autoclear & BIT63


def test_background_thread_flushes_with_the_real_clock(tmp_path):
    path = image(tmp_path, GiB)
    with Tracker.open(path, "b0", policy=FlushPolicy(idle_ms=30)) as t:
        t.write(100 * MiB, 4096)
        assert t.consistent_level == -1
        deadline = time.monotonic() + 10
        while state_of(path)[1].consistent_level != t.max_level and time.monotonic() < deadline:
            time.sleep(0.02)
        entry, a, _, _ = state_of(path)
        assert a.consistent_level == t.max_level
        with Image.open(path) as img:
            assert (read_bits(img, entry) == t.bits()).all()
