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

from qbitmap.check import check_path
from qbitmap.format import references
from qbitmap.recover import Options, recover

MiB = 1 << 20


def _image_with_refcount_block(tmp_path, *extra_opts):
    """A QEMU-made image with bitmap b0 and 1 MiB of data: ``(image, cluster size, file
    offset of its first refcount block, first cluster past the end of the file)``."""
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE, extra_opts=list(extra_opts))
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x51)
    with open(image, "rb") as f:
        head = f.read(104)
        cs = 1 << struct.unpack(">I", head[20:24])[0]
        f.seek(struct.unpack(">Q", head[48:56])[0])
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
    return image, cs, block, -(-image.stat().st_size // cs)


def test_a_huge_leaked_refcount_is_freed_in_one_write(tmp_path):
    image, cs, block, first = _image_with_refcount_block(tmp_path)
    with open(image, "r+b") as f:
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


def test_a_64_bit_refcount_of_2_to_the_64_minus_1_is_freed(tmp_path):
    """A 64-bit refcount at or above 2^63 is a count, not a negative number."""
    image, cs, block, first = _image_with_refcount_block(tmp_path, "refcount_bits=64")
    with open(image, "r+b") as f:
        # inside the file (a leak to qemu-img check) and past its end (invisible to it)
        for cluster, value in ((first, 1 << 63), (first + 3, (1 << 64) - 1)):
            f.seek(block + 8 * cluster)
            f.write(struct.pack(">Q", value))
        f.truncate((first + 1) * cs)
    rc, before = qemu.img_check(image)
    assert rc == 3 and before["leaks"] == 1, before
    assert check_path(image).exit_code == 3  # a leak, as QEMU says; not a refcount too low

    report = recover(image, Options(mode="full"))

    assert report.status == "leaks-reclaimed" and report.leaked_clusters_reclaimed == 2
    _clean(image)
    with open(image, "rb") as f:
        for cluster in (first, first + 3):
            f.seek(block + 8 * cluster)
            assert struct.unpack(">Q", f.read(8))[0] == 0


def test_check_names_what_recover_frees_past_the_end_of_the_file(tmp_path):
    """A refcount past the end of the file, which qemu-img check does not look at: check
    reports it (exit 3, leaks only) rather than calling the image clean while recover
    rewrites a refcount block."""
    image, cs, block, first = _image_with_refcount_block(tmp_path)
    past = first + 5
    with open(image, "r+b") as f:
        f.seek(block + 2 * past)
        f.write(struct.pack(">H", 1))
    rc, before = qemu.img_check(image)
    assert rc == 0 and not before.get("leaks"), before

    report = check_path(image)
    assert report.exit_code == 3
    finding = next(f for f in report.findings if f.code == "image-clusters-leaked-past-eof")
    assert finding.offset == past * cs

    recovered = recover(image, Options(mode="full"))
    assert recovered.status == "leaks-reclaimed" and recovered.leaked_clusters_reclaimed == 1
    _clean(image)
    assert check_path(image).exit_code == 0


def test_more_refcounts_past_the_end_than_are_kept_are_reported_and_left(tmp_path, monkeypatch):
    """Past the walk's bound on refcounts kept one by one, check still counts them all, and
    says that recover leaves them -- which it does."""
    monkeypatch.setattr(references, "PAST_EOF_KEPT", 2)
    image, _cs, block, first = _image_with_refcount_block(tmp_path)
    with open(image, "r+b") as f:
        for cluster in (first + 3, first + 4, first + 6):
            f.seek(block + 2 * cluster)
            f.write(struct.pack(">H", 1))

    report = check_path(image)
    assert report.exit_code == 3
    finding = next(f for f in report.findings if f.code == "image-clusters-leaked-past-eof")
    assert finding.message.startswith("3 clusters past the end of the file")
    assert "'qbitmap recover' leaves them" in finding.message

    recovered = recover(image, Options(mode="full"))
    assert recovered.leaked_clusters_reclaimed == 0
    assert check_path(image).exit_code == 3
