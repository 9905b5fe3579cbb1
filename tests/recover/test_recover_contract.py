"""What a recovered bitmap must mark, at the edges: reverted writes, odd disk sizes; and the
lock bytes recover holds while it writes, taken from what a real QEMU writer holds."""

from __future__ import annotations

import pytest
import qemu
from recover_helpers import covers, granules

from qbitmap.recover import Options, recover
from qbitmap.store import Disk

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def test_reference_keeps_the_on_disk_bits_of_reverted_writes(tmp_path):
    """A granule written and written back to its old content is still dirty on disk: it stays."""
    image = qemu.create_image(tmp_path / "d.qcow2", 64 * MiB)
    qemu.qemu_io_write(image, [(4 * MiB, 128 * KiB)], pattern=0x11)
    backup = tmp_path / "backup.raw"
    qemu.qemu_img("convert", "-O", "raw", image, backup)  # the last backup: 0x11 at 4M
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(4 * MiB, G)], pattern=0x22)  # stored in b0 at the clean close
    qemu.qemu_io_write(image, [(4 * MiB, G)], pattern=0x11)  # back to the backup's content
    qemu.crash_image(image, [(20 * MiB, 4 * KiB)], bitmaps=("b0",))
    assert qemu.guest_read(image, 4 * MiB, 16) == b"\x11" * 16
    report = recover(image, Options(mode="reference", reference=backup))
    assert report.status == "recovered"
    dirty = qemu.nbd_dirty_extents(image, "b0")
    assert covers(dirty, [(4 * MiB, G)]), dirty  # from the on-disk bits, equal data or not
    assert covers(dirty, [(20 * MiB, G)]), dirty  # from the comparison


# Sizes whose bit counts are not a multiple of 8 (or 64), the last granule partial.
ODD = [64 * MiB + 3 * G + 512, 64 * MiB + 9 * G, 5 * G - 1024]


@pytest.mark.parametrize("size", ODD)
@pytest.mark.parametrize("mode", ["full", "reference"])
def test_the_last_granule_of_an_odd_sized_disk(tmp_path, size, mode):
    image = qemu.create_image(tmp_path / "d.qcow2", size)
    backup = tmp_path / "backup.raw"
    qemu.qemu_img("convert", "-O", "raw", image, backup)
    qemu.add_bitmap(image, "b0")
    qemu.add_bitmap(image, "b1", granularity=4096)
    last = size - 512
    qemu.crash_image(image, [(last, 512), (G, 512)], bitmaps=("b0", "b1"))
    options = Options(mode="full") if mode == "full" else Options(reference=backup)
    report = recover(image, options)
    assert report.status == "recovered"
    for name, gran in (("b0", G), ("b1", 4096)):
        dirty = qemu.nbd_dirty_extents(image, name)
        assert covers(dirty, granules([(last, 512), (G, 512)], gran, size)), (name, dirty)
        assert dirty[-1][0] + dirty[-1][1] == size  # cut at the disk's end, not past it
        if mode == "full":
            assert dirty == [(0, size)]
    assert qemu.img_check(image)[0] == 0


class _LockProbe:
    """A Disk wrapper that records QEMU's lock bytes, as another process sees them, per write."""

    def __init__(self, inner: Disk, path) -> None:
        self.inner, self.path, self.seen = inner, path, []

    def pread(self, offset, length):
        return self.inner.pread(offset, length)

    def pwrite(self, offset, data):
        self.seen.append(qemu.lock_bytes_held(self.path))
        self.inner.pwrite(offset, data)

    def flush(self):
        self.seen.append(qemu.lock_bytes_held(self.path))
        self.inner.flush()

    def size(self):
        return self.inner.size()


def test_recover_holds_a_qemu_writers_lock_bytes_up_to_its_last_write(tmp_path):
    # What QEMU itself holds while it writes an image: learnt from a real one, not from
    # qbitmap's own constant.
    scratch = qemu.create_image(tmp_path / "scratch.qcow2", 16 * MiB)
    with qemu.StorageDaemon(scratch, writable=True):
        qemu_writer = qemu.lock_bytes_held(scratch)
    assert {101, 201} <= qemu_writer
    image = qemu.create_image(tmp_path / "d.qcow2", 64 * MiB)
    qemu.add_bitmap(image, "b0")
    qemu.crash_image(image, [(MiB, 4096)], bitmaps=("b0",))
    probes = []

    def wrap(inner):
        probes.append(_LockProbe(inner, image))
        return probes[-1]

    report = recover(image, Options(mode="full"), disk_wrapper=wrap)
    assert report.status == "recovered"
    seen = probes[0].seen
    assert len(seen) > 5
    assert all(qemu_writer <= held for held in seen), (qemu_writer, seen)
    assert qemu.lock_bytes_held(image) == set()  # released at the end
