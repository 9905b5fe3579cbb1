"""Bitmap names as QEMU reads them: C strings, the bytes before the first NUL."""

from __future__ import annotations

import corrupt
import qemu
from checkrun import run_check


def test_b_selects_by_the_name_qemu_sees(base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", "name-nul-harmless")  # b"b0\0x"
    assert "b0" in qemu.img_bitmaps(image)  # QEMU's own name for it
    run = run_check("--json", "-b", "b0", image)
    assert run.exit_code == 0, run.stdout
    assert [b["name"] for b in run.json["bitmaps"]] == ["b0\x00x"]
    note = next(f for f in run.json["findings"] if f["code"] == "bitmap-name-nul")
    assert "'b0'" in note["message"]
    # The bytes on disk are not what QEMU calls it: no bitmap of that name.
    assert run_check("-b", "b0\x00x", image).exit_code == 64


def test_names_equal_up_to_the_nul_are_a_duplicate(base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", "name-nul-duplicate")  # a\0x, a\0y
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    run = run_check("--json", image)
    assert run.exit_code == 2
    dup = next(f for f in run.json["findings"] if f["code"] == "bitmap-name-duplicate")
    assert dup["bitmap"] == "a\x00y" and "'a'" in dup["message"]
    # -b a picks both entries QEMU would call "a".
    both = run_check("--json", "-b", "a", image)
    assert [b["name"] for b in both.json["bitmaps"]] == ["a\x00x", "a\x00y"]
