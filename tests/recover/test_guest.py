"""The guest data reader against QEMU's own reading (qemu-img convert -O raw)."""

from __future__ import annotations

import numpy as np
import pytest
import qemu

from qbitmap.format.guest import COMPRESSED, DATA, GuestDisk
from qbitmap.recover.reference import diff_bits

MiB = 1 << 20


def qemu_raw(path, tmp_path) -> bytes:
    out = tmp_path / "expected.raw"
    qemu.qemu_img("convert", "-O", "raw", path, out)
    return out.read_bytes()


def scribble(path, seed, *, n=12, size=32 * MiB):
    rng = np.random.default_rng(seed)
    cmds = []
    for i in range(n):
        off = int(rng.integers(0, size - 200_000))
        length = int(rng.integers(1, 200_000))
        if i % 4 == 3:
            cmds.append(f"write -z {off} {length}")
        else:
            cmds.append(f"write -P {int(rng.integers(1, 255))} {off} {length}")
    qemu.qemu_io(path, *cmds)


@pytest.mark.parametrize(
    "variant",
    [
        "plain",
        "extended_l2",
        "backing",
        "backing_raw",
        "short_backing",
        "deflate",
        "zstd",
        "zstd_extended_l2",
    ],
)
def test_guest_bytes_match_qemu(tmp_path, variant):
    size = 32 * MiB
    if variant in ("backing", "short_backing", "backing_raw"):
        base_size = 8 * MiB if variant == "short_backing" else size
        base = qemu.create_image(tmp_path / "base.qcow2", base_size)
        scribble(base, 1, size=base_size)
        if variant == "backing_raw":
            raw = tmp_path / "base.raw"
            qemu.qemu_img("convert", "-O", "raw", base, raw)
            base = raw
        path = qemu.create_image(
            tmp_path / "top.qcow2",
            size,
            backing=base,
            backing_fmt="raw" if variant == "backing_raw" else "qcow2",
            extended_l2=True,
            cluster_size=65536,
        )
        scribble(path, 2)
    else:
        src = qemu.create_image(tmp_path / "src.qcow2", size, extended_l2=variant == "extended_l2")
        scribble(src, 3)
        if variant in ("plain", "extended_l2"):
            path = src
        else:
            opts = ["-o", "compression_type=" + ("zstd" if "zstd" in variant else "zlib")]
            if variant == "zstd_extended_l2":
                opts[-1] += ",extended_l2=on"
            path = tmp_path / "c.qcow2"
            qemu.qemu_img("convert", "-c", "-O", "qcow2", *opts, src, path)
            qemu.qemu_io(path, "write -P 0x77 1M 70k")  # some uncompressed clusters too
    expected = qemu_raw(path, tmp_path)
    with GuestDisk(path) as disk:
        assert disk.size == len(expected)
        assert disk.read(0, disk.size) == expected
        # Segments tile the disk exactly, in order.
        pos = 0
        for seg in disk.segments():
            assert seg.start == pos and seg.length > 0
            pos = seg.end
        assert pos == disk.size
        if "zstd" in variant or "deflate" in variant:
            assert any(s.kind == COMPRESSED for s in disk.segments())


def test_raw_holes_are_zero_segments_and_never_read(tmp_path):
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"\x01" * MiB)
    with GuestDisk(path) as disk:
        kinds = [(s.start, s.length, s.kind) for s in disk.segments()]
        assert (10 * MiB, MiB, DATA) in kinds
        assert sum(n for _s, n, k in kinds if k == DATA) == MiB


def test_shared_backing_is_skipped_without_reading(tmp_path):
    base = qemu.create_image(tmp_path / "base.qcow2", 64 * MiB)
    qemu.qemu_io_write(base, [(0, 20 * MiB)], pattern=0x11)
    a = qemu.create_image(tmp_path / "a.qcow2", None, backing=base)
    b = qemu.create_image(tmp_path / "b.qcow2", None, backing=base)
    qemu.qemu_io_write(a, [(5 * MiB, 4096)], pattern=0x22)
    qemu.qemu_io_write(
        b, [(30 * MiB, 4096)], pattern=0x00
    )  # zeros written as data: equal to unallocated
    bits, stats = diff_bits(a, b, virtual_size=64 * MiB, granularity=65536)
    assert np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist() == [5 * MiB // 65536]
    # Only the two written clusters were compared (reading a's cluster and the base data under
    # it, and b's cluster, whose other side is zero); the 20 MiB of shared backing data were not.
    assert stats.compared_bytes == 2 * 65536
    assert stats.image_bytes_read + stats.reference_bytes_read == 3 * 65536
    assert stats.skipped_bytes >= 64 * MiB - 2 * 65536


def test_different_sizes_compare_as_zeros_past_the_end(tmp_path):
    image = qemu.create_image(tmp_path / "i.qcow2", 16 * MiB)
    qemu.qemu_io_write(image, [(15 * MiB, 4096)], pattern=0x33)
    ref = tmp_path / "r.raw"
    ref.write_bytes(b"")
    with open(ref, "r+b") as f:
        f.truncate(8 * MiB)
    bits, stats = diff_bits(image, ref, virtual_size=16 * MiB, granularity=65536)
    assert np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist() == [15 * MiB // 65536]
    assert stats.reference_size == 8 * MiB


def test_an_unreadable_backing_file_is_named_with_the_image_that_refers_to_it(tmp_path):
    from qbitmap.errors import QbitmapError
    from qbitmap.format.guest import GuestDisk

    base = qemu.create_image(tmp_path / "base.qcow2", 1 << 20)
    top = qemu.create_image(tmp_path / "top.qcow2", None, backing=base)
    base.write_bytes(b"not an image at all" * 100)  # now probed as... qcow2 by the format name
    with pytest.raises(QbitmapError) as info:
        GuestDisk(top)
    text = str(info.value)
    assert str(base) in text and f"the backing file of {top}" in text
    base.unlink()
    with pytest.raises(QbitmapError) as info:
        GuestDisk(top)
    assert f"the backing file of {top}" in str(info.value)


def test_a_fifo_in_the_backing_chain_is_refused_at_once(tmp_path):
    import os
    import signal

    from qbitmap.errors import QbitmapError

    base = qemu.create_image(tmp_path / "base.qcow2", 1 << 20)
    top = qemu.create_image(tmp_path / "top.qcow2", None, backing=base)
    base.unlink()
    os.mkfifo(base)  # opening it for reading would wait for a writer forever

    def hung(signum, frame):
        raise TimeoutError("opening the chain hung on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(QbitmapError, match="not a regular file or block device"):
            GuestDisk(top)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
