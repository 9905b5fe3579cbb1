"""A real crash and a live writer, with qemu-storage-daemon serving the image over NBD."""

from __future__ import annotations

import qemu
from checkrun import run_check

MiB = 1024 * 1024


def _image(tmp_path):
    img = qemu.create_image(tmp_path / "vm.qcow2", 256 * MiB)
    qemu.add_bitmap(img, "b0")
    qemu.qemu_io_write(img, [(0, MiB)], pattern=0x11)  # stored at qemu-io's clean exit
    return img


def test_sigkill_leaves_in_use_bitmap_that_qemu_check_does_not_see(tmp_path):
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    img = _image(tmp_path)
    daemon = qemu.StorageDaemon(img, writable=True)
    try:
        daemon.start()
        daemon.writes([(8 * MiB, 64 * 1024), (100 * MiB, 3 * MiB)], pattern=0x5A, flush=True)
        daemon.kill()
    finally:
        daemon.close()
    assert qemu.lock_bytes_held(img) == set()

    run = run_check("--json", img)
    assert run.exit_code == 4
    assert run.json["exit_code"] == 4
    in_use = [f for f in run.json["findings"] if f["code"] == "bitmap-in-use"]
    assert len(in_use) == 1 and in_use[0]["bitmap"] == "b0"
    assert "qbitmap recover --mode full" in in_use[0]["message"]
    assert "no consistency-level record" in in_use[0]["message"]
    assert "image-in-use-live" not in run.codes()
    assert run.json["bitmaps"] == [
        {"name": "b0", "status": "in-use", "levels": {"status": "absent"}}
    ]

    # The gap: QEMU's own check calls the image clean.
    code, report = qemu.img_check(img)
    assert code == 0, report
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    assert "in-use" in qemu.img_bitmaps(img)["b0"]["flags"]


def test_live_writer_is_reported_as_such(tmp_path):
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    img = _image(tmp_path)
    with qemu.StorageDaemon(img, writable=True) as daemon:
        daemon.writes([(4 * MiB, 64 * 1024)], flush=True)
        assert {101, 201} <= qemu.lock_bytes_held(img)
        run = run_check("--json", img)
        # Not a crash: the bitmaps live in the writer's memory (exit 75, not 4).
        assert run.exit_code == 75
        assert run.json["exit_code"] == 75
        codes = run.codes()
        assert "bitmap-in-use-live" in codes
        assert "bitmap-in-use" not in codes
        note = next(f for f in run.json["findings"] if f["code"] == "image-held-by-writer")
        assert note["severity"] == "busy"
        assert "running writer" in note["message"] and "memory" in note["message"]
        # The structural findings are still reported: the bitmap is listed and judged.
        assert [b["name"] for b in run.json["bitmaps"]] == ["b0"]
        # check took no lock: the running daemon still answers and can write.
        daemon.writes([(5 * MiB, 64 * 1024)], flush=True)
    # Clean stop: the bitmap is stored, nothing held, all consistent.
    run = run_check("--json", img)
    assert run.exit_code == 0, run.json
    assert run.json["findings"] == []


def test_live_reader_does_not_make_bitmaps_live_in_use(tmp_path):
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    img = _image(tmp_path)
    with qemu.StorageDaemon(img, read_only=True):
        run = run_check("--json", img)
    assert run.exit_code == 0
    note = next(f for f in run.json["findings"] if f["code"] == "image-in-use-live")
    assert "for reading" in note["message"]
