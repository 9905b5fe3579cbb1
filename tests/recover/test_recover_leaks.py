"""recover frees a leaked cluster with one refcount write, however high its refcount.

A random word in a refcount block gives clusters nothing references refcounts
of tens of thousands (16-bit) or up to 2^63 (64-bit); QEMU calls the image
clean or leaky.  Freeing such a cluster one reference at a time took seconds
to forever.
"""

from __future__ import annotations

import struct

import qemu
from recover_helpers import SIZE
from recover_helpers import clean as _clean

from qbitmap.recover import Options, recover

MiB = 1 << 20


def test_a_huge_leaked_refcount_is_freed_in_one_write(tmp_path):
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x51)
    with open(image, "rb") as f:
        head = f.read(104)
    cs = 1 << struct.unpack(">I", head[20:24])[0]
    reftable = struct.unpack(">Q", head[48:56])[0]
    first = -(-image.stat().st_size // cs)
    with open(image, "r+b") as f:
        f.seek(reftable)
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        # the highest 16-bit refcount on two clusters nothing references: one inside the
        # file (a leak to qemu-img check), one past its end (which qemu-img check ignores)
        for cluster in (first, first + 3):
            f.seek(block + 2 * cluster)
            f.write(struct.pack(">H", 0xFFFF))
        f.truncate((first + 1) * cs)
    rc, before = qemu.img_check(image)
    assert rc == 3 and before["leaks"] == 1, before

    report = recover(image, Options(mode="full"))

    assert report.status == "leaks-reclaimed" and report.leaked_clusters_reclaimed == 2
    refcount_writes = [w for w in report.writes if block <= w[0] < block + cs]
    assert 1 <= len(refcount_writes) <= 2, len(refcount_writes)
    _clean(image)
    assert "in-use" not in qemu.img_bitmaps(image)["b0"]["flags"]
