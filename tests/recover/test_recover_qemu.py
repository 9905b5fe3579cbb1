"""recover on images crashed for real (qemu-storage-daemon SIGKILLed), checked by QEMU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import qemu
from recover_helpers import (
    BASE_WRITES,
    CRASH_WRITES,
    SIZE,
    STORED_WRITES,
    G,
    assert_qemu_accepts,
    covers,
    granules,
    run_cli,
    sha,
)

from qbitmap.errors import ExitCode
from qbitmap.format import Image, layout


@pytest.mark.parametrize("ref", ["backup", "backup_raw"])
def test_reference_mode_is_exact(crashed, ref):
    result = run_cli("recover", "--json", "--reference", getattr(crashed, ref), crashed.image)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "recovered"
    assert {b["name"]: b["mode"] for b in report["bitmaps"]} == {
        "b0": "reference",
        "b1": "reference",
    }
    assert_qemu_accepts(crashed.image)
    writes = STORED_WRITES + CRASH_WRITES
    assert qemu.nbd_dirty_extents(crashed.image, "b0") == granules(writes, G)
    assert qemu.nbd_dirty_extents(crashed.image, "b1") == granules(writes, 4096)
    # Only the allocated ranges were read, not the 256 MiB disk.
    assert report["reference"]["compared_bytes"] < 16 << 20
    # QEMU can merge and clear them.
    qemu.add_bitmap(crashed.image, "merged")
    qemu.bitmap_op(crashed.image, "merged", "--merge", "b0")
    assert qemu.nbd_dirty_extents(crashed.image, "merged") == granules(writes, G)
    qemu.bitmap_op(crashed.image, "b0", "--clear")
    assert qemu.nbd_dirty_extents(crashed.image, "b0") == []
    assert_qemu_accepts(crashed.image)


def test_full_mode_sets_every_bit(crashed):
    result = run_cli("recover", "--mode", "full", crashed.image)
    assert result.exit_code == 0, result.output
    assert_qemu_accepts(crashed.image)
    assert qemu.nbd_dirty_extents(crashed.image, "b0") == [(0, SIZE)]
    assert qemu.nbd_dirty_extents(crashed.image, "b1") == [(0, SIZE)]
    with Image.open(crashed.image) as image:
        entry = image.read_directory().entries[0]
        table = image.read_bitmap_table(entry)
        # 256 MiB at 64 KiB = 4096 bits: one partial cluster -> a data cluster, not all-ones.
        assert (int(table[0]) & layout.BITMAP_TABLE_OFFSET_MASK) != 0


def test_one_bitmap_selected_the_other_stays_in_use(crashed):
    result = run_cli("recover", "-b", "b1", "--reference", crashed.backup, crashed.image)
    assert result.exit_code == 0, result.output
    bitmaps = qemu.img_bitmaps(crashed.image)
    assert "in-use" in bitmaps["b0"]["flags"] and "in-use" not in bitmaps["b1"]["flags"]
    rc, report = qemu.img_check(crashed.image)
    assert rc == 0, report
    assert qemu.nbd_dirty_extents(crashed.image, "b1") == granules(
        STORED_WRITES + CRASH_WRITES, 4096
    )


def test_auto_without_a_choice_refuses_and_lists_the_choices(crashed):
    before = sha(crashed.image)
    result = run_cli("recover", crashed.image)
    assert result.exit_code == ExitCode.FAILED
    for choice in ("--reference FILE", "--mode full", "--mode level"):
        assert choice in result.stderr
    assert sha(crashed.image) == before


def test_dry_run_writes_nothing_and_shows_the_plan(crashed):
    before = sha(crashed.image)
    result = run_cli("recover", "--dry-run", "--json", "--mode", "full", crashed.image)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "dry-run" and report["dry_run"] is True
    phases = [s["phase"] for s in report["steps"]]
    assert phases.index("commit") < phases.index("release")
    assert [s["action"] for s in report["steps"]].count("header") == 1
    assert sha(crashed.image) == before
    human = run_cli("recover", "--dry-run", "--mode", "full", crashed.image)
    assert "nothing was written" in human.stdout and "header" in human.stdout


def test_nothing_to_do_on_a_clean_image(tmp_path):
    image = qemu.create_image(tmp_path / "clean.qcow2", "64M")
    qemu.add_bitmap(image, "b0")
    before = sha(image)
    result = run_cli("recover", "--json", image)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["status"] == "nothing-to-do"
    assert sha(image) == before


def test_busy_image_exit_75_and_no_byte_changed(crashed):
    with qemu.StorageDaemon(crashed.image, writable=False, read_only=True):
        before = sha(crashed.image)
        result = run_cli("recover", "--mode", "full", crashed.image)
        assert result.exit_code == 75
        assert "is QEMU or another qbitmap using the image?" in result.stderr
        assert sha(crashed.image) == before


def test_usage_errors_exit_64(crashed):
    assert run_cli("recover", "--mode", "reference", crashed.image).exit_code == 64
    assert (
        run_cli("recover", "--mode", "full", "--reference", crashed.backup, crashed.image).exit_code
        == 64
    )
    assert run_cli("recover", "--mode", "full", "-b", "nope", crashed.image).exit_code == 64


def test_level_mode_from_a_tracker_record(tmp_path):
    from qbitmap import levels
    from qbitmap.track import Tracker

    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    tracker = Tracker.open(image, "b0", level_bits=3)
    rng = np.random.default_rng(5)
    for _ in range(40):
        off = int(rng.integers(0, SIZE - 8192))
        tracker.write(off, int(rng.integers(1, 8192)))
    truth = tracker.bits()
    tracker.abandon()  # as if the writer died: in use, record kept
    assert "in-use" in qemu.img_bitmaps(image)["b0"]["flags"]
    result = run_cli("recover", "--json", image)  # auto picks the trusted record
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bitmaps"][0]["mode"] == "level"
    assert_qemu_accepts(image, names=("b0",))
    with Image.open(image) as img:
        assert img.read_levels() is None  # the record is gone
        assert not (img.header.autoclear_features or 0) >> 63
        from qbitmap.format import read_bits

        entry = img.read_directory().entries[0]
        got = read_bits(img, entry)
    assert not np.any(truth & ~got), "the recovered bitmap must cover every tracked write"
    assert levels  # imported for the reader


def test_level_mode_refuses_without_a_trusted_record(crashed):
    result = run_cli("recover", "--mode", "level", crashed.image)
    assert result.exit_code == 1
    assert "trusted consistency-level record" in result.stderr


def test_image_with_backing_chain_extended_l2_and_compressed_reference(tmp_path):
    base = qemu.create_image(tmp_path / "base.qcow2", SIZE)
    qemu.qemu_io_write(base, BASE_WRITES, pattern=0x11)
    image = qemu.create_image(tmp_path / "top.qcow2", None, backing=base, extended_l2=True)
    qemu.qemu_io_write(image, [(5 << 20, 8192)], pattern=0x33)
    qemu.qemu_io(image, "write -z 40M 4k")
    # The backup: a compressed (zstd) full copy, as a backup tool would keep it.
    backup = tmp_path / "backup.qcow2"
    qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", image, backup)
    qemu.add_bitmap(image, "b0", granularity=16384)
    qemu.crash_image(image, CRASH_WRITES + [(40 << 20, 512)], bitmaps=("b0",))
    result = run_cli("recover", "--reference", backup, image)
    assert result.exit_code == 0, result.output
    assert_qemu_accepts(image, names=("b0",))
    assert qemu.nbd_dirty_extents(image, "b0") == granules(CRASH_WRITES + [(40 << 20, 512)], 16384)


def test_recovered_bitmap_is_served_by_qemu_nbd(crashed):
    assert run_cli("recover", "--reference", crashed.backup_raw, crashed.image).exit_code == 0
    extents = qemu.nbd_dirty_extents(crashed.image, "b0")
    assert covers(extents, STORED_WRITES + CRASH_WRITES)
    shutil.copyfile(crashed.image, crashed.tmp / "copy.qcow2")
