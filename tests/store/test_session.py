"""WriteSession end to end: bitmaps written through the store are what QEMU reads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import qemu
from crashdisk import CrashingDisk, SimulatedCrash
from store_helpers import add_bitmap_with_store, bits_to_extents, check_counts, sha

from qbitmap.format import Geometry, Image, layout, read_bits
from qbitmap.store import WriteSession, levels_extension_bytes, new_level_record


def random_bits(geo: Geometry, seed: int, *, full_clusters: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = (rng.random(geo.nbytes) < 0.02).astype(np.uint8) * rng.integers(
        1, 256, geo.nbytes, dtype=np.uint8
    )
    if full_clusters and geo.table_size > 2:
        bits[: geo.cluster_size] = 0xFF  # a full cluster of ones: all-ones table entry
        bits[geo.cluster_size : 2 * geo.cluster_size] = 0  # an empty cluster: entry 0
    return bits


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_bitmap_written_by_store_is_read_by_qemu(img, refcount_bits):
    path = img("64M", cluster_size=512, refcount_bits=refcount_bits)
    geo = Geometry(64 << 20, 512, 512)  # 131072 bits = 32 data clusters
    bits = random_bits(geo, refcount_bits, full_clusters=True)
    s = add_bitmap_with_store(path, "b0", bits, granularity_bits=9)
    assert any(step.action == "header" for step in s.journal)
    assert check_counts(path) == (0, 0, 0)
    assert qemu.img_bitmaps(path)["b0"]["flags"] == ["auto"]
    assert qemu.nbd_dirty_extents(path, "b0") == bits_to_extents(bits, 512, 64 << 20)
    with Image.open(path) as image:
        entry = image.read_directory().entries[0]
        table = image.read_bitmap_table(entry)
        assert int(table[0]) == layout.BITMAP_TABLE_ALL_ONES
        assert int(table[1]) == 0
        assert np.array_equal(read_bits(image, entry), bits)
    # QEMU can use it: merge into a second bitmap, clear it.
    qemu.add_bitmap(path, "b1", granularity=512)
    qemu.bitmap_op(path, "b1", "--merge", "b0")
    assert qemu.nbd_dirty_extents(path, "b1") == bits_to_extents(bits, 512, 64 << 20)
    qemu.bitmap_op(path, "b0", "--clear")
    assert check_counts(path) == (0, 0, 0)


def test_second_bitmap_replaces_directory_and_frees_the_old_one(img):
    path = img("1G")
    qemu.add_bitmap(path, "first")
    geo = Geometry(1 << 30, 65536, 65536)
    bits = random_bits(geo, 7)
    add_bitmap_with_store(path, "second", bits)
    assert check_counts(path) == (0, 0, 0)
    assert set(qemu.img_bitmaps(path)) == {"first", "second"}
    assert qemu.nbd_dirty_extents(path, "second") == bits_to_extents(bits, 65536, 1 << 30)


def test_header_rewrite_keeps_backing_file_and_unknown_extensions(img, tmp_path):
    base = img("16M", name="base.qcow2")
    path = qemu.create_image(tmp_path / "top.qcow2", "16M")
    qemu.append_header_extension(path, 0x12345678, b"keep me")
    qemu.qemu_img("rebase", "-u", "-b", base, "-F", "qcow2", path)  # QEMU keeps the extension
    before = qemu.img_info(path)
    with WriteSession.open(path) as s:
        record = new_level_record(
            b"b0",
            bitmap_table_offset=0x10000,
            consistent_level=1,
            level_bits=6,
            max_level=1,
            granularity_bits=16,
        )
        s.commit_header(
            extensions={layout.EXT_LEVELS: levels_extension_bytes([record])}, autoclear_set=1 << 63
        )
    after = qemu.img_info(path)
    assert after["backing-filename"] == before["backing-filename"]
    assert after["backing-filename-format"] == "qcow2"
    magics = [m for _o, m, _d in qemu.header_extensions(path)]
    assert 0x12345678 in magics and layout.EXT_LEVELS in magics
    assert qemu.read_autoclear(path) >> 63 == 1
    with Image.open(path) as image:
        levels = image.read_levels()
        assert levels is not None and levels.records[0].consistent_level == 1
        # A 4-byte in-place update of consistent_level.
    with WriteSession.open(path) as s:
        rec = s.image.read_levels().records[0]
        s.write_field(
            rec.consistent_level_offset, (-1).to_bytes(4, "big", signed=True), what="level"
        )
        s.commit_header(extensions={layout.EXT_LEVELS: None}, autoclear_clear=1 << 63)
    magics = [m for _o, m, _d in qemu.header_extensions(path)]
    assert layout.EXT_LEVELS not in magics and 0x12345678 in magics
    assert qemu.read_autoclear(path) >> 63 == 0
    assert check_counts(path) == (0, 0, 0)
    assert qemu.img_info(path)["backing-filename"] == before["backing-filename"]


def test_dry_run_changes_nothing_but_journals_everything(img):
    path = img("256M")
    before = sha(path)
    geo = Geometry(256 << 20, 65536, 65536)
    s = add_bitmap_with_store(path, "b0", random_bits(geo, 3), dry_run=True)
    assert sha(path) == before
    actions = [step.action for step in s.journal]
    assert actions.count("header") == 1 and "allocate" in actions


def _ops_of_add(template, tmp_path, bits):
    probe = tmp_path / "probe.qcow2"
    probe.write_bytes(template.read_bytes())
    holder = {}

    def wrap(d):
        holder["disk"] = CrashingDisk(d, None)
        return holder["disk"]

    add_bitmap_with_store(probe, "b1", bits, granularity_bits=9, disk_wrapper=wrap)
    return holder["disk"].ops


@pytest.mark.parametrize("lose_unflushed", [False, True])
def test_crash_at_every_operation_of_a_bitmap_store(img, tmp_path, lose_unflushed):
    template = img("64M", cluster_size=512, refcount_bits=16, name="t.qcow2")
    qemu.add_bitmap(template, "b0", granularity=512)
    geo = Geometry(64 << 20, 512, 512)
    bits = random_bits(geo, 11)
    total = _ops_of_add(template, tmp_path, bits)
    assert total >= 6
    outcomes = set()
    for crash_at in range(total):
        path = tmp_path / "c.qcow2"
        path.write_bytes(template.read_bytes())
        with pytest.raises(SimulatedCrash):
            add_bitmap_with_store(
                path,
                "b1",
                bits,
                granularity_bits=9,
                disk_wrapper=lambda d, n=crash_at: CrashingDisk(
                    d, n, lose_unflushed=lose_unflushed, rng=random.Random(n)
                ),
            )
        rc, corruptions, _leaks = check_counts(path)
        assert corruptions == 0 and rc in (0, 3), crash_at
        names = set(qemu.img_bitmaps(path))
        assert names in ({"b0"}, {"b0", "b1"}), names
        if "b1" in names:
            assert qemu.nbd_dirty_extents(path, "b1") == bits_to_extents(bits, 512, 64 << 20)
        outcomes.add(frozenset(names))
    assert len(outcomes) == 2  # some crashes came before the commit, some after
