"""A disk of 0 bytes with in-use bitmaps: QEMU opens it, but accepts no table for such a bitmap."""

from __future__ import annotations

import corrupt
import qemu
from checkrun import run_check


def test_in_use_bitmaps_of_a_zero_byte_disk_are_not_recoverable(tmp_path):
    image = corrupt.zero_byte_disk_with_in_use_bitmaps(tmp_path / "z.qcow2")
    # QEMU opens the image and lists both bitmaps, in use.
    assert qemu.img_check(image)[0] == 0
    listed = qemu.img_bitmaps(image)
    assert set(listed) == {"b0", "b1"} and all("in-use" in b["flags"] for b in listed.values())
    run = run_check("--json", image)
    assert run.exit_code == 2, run.stdout
    zero = [f for f in run.json["findings"] if f["code"] == "bitmap-disk-size-zero"]
    assert [f["bitmap"] for f in zero] == ["b0", "b1"]
    assert zero[0]["severity"] == "corrupt" and zero[0]["offset"] == 24
    assert "--drop-broken" in zero[0]["message"]
    assert "bitmap-table-size-stale" not in run.codes()
    assert {b["status"] for b in run.json["bitmaps"]} == {"corrupt"}
