"""``qbitmap.open_image``: bitmaps, extents and guest data, judged by QEMU's own tools.

Images are made and written by qemu-img and qemu-io; what the API reads is
compared with what QEMU reports (``qemu-img info``), exports
(``qemu-nbd -B`` + ``nbdinfo``), reads (``qemu-img convert``, ``qemu-io``)
and with what ``qbitmap dump --json --extents`` prints for every image of
the corruption catalogue.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import corrupt
import pytest
import qemu
from click.testing import CliRunner

import qbitmap
from qbitmap.cli import cli

MiB = 1 << 20
# Not a multiple of the 64 KiB granularity: the last granule is cut at the disk's end.
SIZE = 64 * MiB + 8192


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three bitmaps (enabled 64 KiB, enabled 4 KiB, disabled 1 MiB) after guest writes."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    path = qemu.create_image(tmp_path_factory.mktemp("written") / "disk.qcow2", SIZE)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "fine", granularity=4096)
    qemu.add_bitmap(path, "off", granularity=MiB, disabled=True)
    qemu.qemu_io(
        path,
        "write -P 0x11 0 100k",
        "write -P 0x22 3M 1",
        "write -z 10M 1M",
        "write -c -P 0x33 20M 64k",
        f"write -P 0x44 {SIZE - 4096} 4096",
    )
    path.chmod(0o444)
    return path


def test_bitmaps_are_what_qemu_img_info_says(written: Path) -> None:
    theirs = qemu.img_bitmaps(written)
    with qbitmap.open_image(written) as image:
        assert (image.filename, image.virtual_size, image.cluster_size) == (
            str(written),
            SIZE,
            65536,
        )
        mine = image.bitmaps
        assert image.bitmap("fine") == mine[1]
    assert [b.name for b in mine] == list(theirs) == ["b0", "fine", "off"]
    for bitmap in mine:
        qemu_view = theirs[bitmap.name]
        assert bitmap.granularity == qemu_view["granularity"]
        assert list(bitmap.flags) == qemu_view["flags"]
        assert bitmap.recording == ("auto" in qemu_view["flags"])
        assert not bitmap.in_use and not bitmap.stale
        exported = qemu.nbd_dirty_extents(written, bitmap.name)
        assert bitmap.dirty_bytes == sum(length for _, length in exported)
    assert [b.recording for b in mine] == [True, True, False]
    assert mine[2].dirty_bytes == 0 and mine[0].dirty_bytes > mine[1].dirty_bytes > 0


@pytest.mark.parametrize("name", ["b0", "fine", "off"])
def test_extents_are_what_qemu_exports(written: Path, name: str) -> None:
    with qbitmap.open_image(written) as image:
        mine = list(image.extents(name))
    assert mine == qemu.nbd_dirty_extents(written, name)
    assert all(isinstance(n, int) for pair in mine for n in pair)
    if name == "b0":
        # The write 4 KiB before the end dirties the last granule, cut at the disk's end.
        assert mine[-1] == (64 * MiB, 8192)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An overlay over a qcow2 base over a raw bottom, each layer written by qemu-io."""
    qemu.require_tools("qemu-img", "qemu-io")
    root = tmp_path_factory.mktemp("chain")
    bottom = root / "bottom.raw"
    qemu.qemu_img("create", "-q", "-f", "raw", bottom, str(SIZE))
    qemu.qemu_io_write(bottom, [(0, 8 * MiB)], pattern=0x01, fmt="raw")
    base = qemu.create_image(root / "base.qcow2", None, backing=bottom, backing_fmt="raw")
    qemu.qemu_io(base, "write -P 0x02 1M 3M", "write -c -P 0x03 6M 64k", "write -z 7M 64k")
    top = qemu.create_image(root / "top.qcow2", None, backing=base, cluster_size=4096)
    qemu.add_bitmap(top, "b0", granularity=MiB)
    qemu.qemu_io(top, "write -P 0x04 2M 5000", "write -z 3M 4096", "discard 40M 1M")
    return top


def test_read_is_the_guest_data_qemu_reads(chain: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat.raw"
    qemu.qemu_img("convert", "-U", "-O", "raw", chain, flat)
    expected = flat.read_bytes()
    with qbitmap.open_image(chain) as image:
        whole = b"".join(image.read(at, 3 * MiB) for at in range(0, SIZE - 3 * MiB, 3 * MiB))
        whole += image.read(len(whole), SIZE - len(whole))
        assert whole == expected
        for offset, length in [(2 * MiB - 7, 5020), (6 * MiB + 100, 70000), (SIZE - 1, 1)]:
            assert image.read(offset, length) == qemu.guest_read(chain, offset, length)
        assert image.read(SIZE, 0) == b""


def test_a_backup_loop_reads_each_dirty_range_through_the_chain(
    chain: Path, tmp_path: Path
) -> None:
    qemu.require_tools("qemu-nbd", "nbdinfo")
    flat = tmp_path / "flat.raw"
    qemu.qemu_img("convert", "-U", "-O", "raw", chain, flat)
    expected = flat.read_bytes()
    with qbitmap.open_image(chain) as image:
        ranges = list(image.extents("b0"))
        # The 5000-byte write and the zero write in one 2 MiB run of 1 MiB granules; the discard.
        assert (
            ranges == qemu.nbd_dirty_extents(chain, "b0") == [(2 * MiB, 2 * MiB), (40 * MiB, MiB)]
        )
        for start, length in ranges:
            assert image.read(start, length) == expected[start : start + length]


def test_stale_bitmaps_are_refused_unless_asked(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon", "qemu-nbd", "nbdinfo")
    path = qemu.create_image(tmp_path / "crashed.qcow2", SIZE)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(MiB, 4096)])
    before = qemu.nbd_dirty_extents(path, "b0")
    qemu.crash_image(path, [(5 * MiB, 4096)])
    with qbitmap.open_image(path) as image:
        bitmap = image.bitmap("b0")
        assert bitmap.in_use and bitmap.stale and bitmap.flags == ("in-use", "auto")
        with pytest.raises(qbitmap.StaleBitmapError, match="is in use") as caught:
            image.extents("b0")
        assert caught.value.exit_code == qbitmap.ExitCode.IN_USE == 4
        # What is on disk: the contents at the last clean close, without the crashed write.
        assert list(image.extents("b0", allow_stale=True)) == before


def test_bitmaps_of_an_extension_qemu_ignores_are_stale(base_image: Path, tmp_path: Path) -> None:
    path = corrupt.apply(base_image, tmp_path / "ignored.qcow2", "autoclear-bit0-clear")
    with qbitmap.open_image(path) as image:
        assert [(b.in_use, b.stale) for b in image.bitmaps] == [(False, True), (False, True)]
        with pytest.raises(qbitmap.StaleBitmapError, match="autoclear bit 0"):
            image.extents("b0")


def test_names_and_ranges_the_image_does_not_have(written: Path) -> None:
    with qbitmap.open_image(written) as image:
        for call in (lambda: image.bitmap("nope"), lambda: image.extents("nope")):
            with pytest.raises(qbitmap.UsageError, match="no bitmap named 'nope'") as caught:
                call()
            assert caught.value.exit_code == 64
        for offset, length in [(-1, 1), (0, -1), (SIZE - 1, 2), (SIZE + 1, 0)]:
            with pytest.raises(qbitmap.UsageError, match="not inside the disk"):
                image.read(offset, length)


def test_every_listed_name_finds_its_bitmap(base_image: Path, tmp_path: Path) -> None:
    """Names QEMU cuts at a NUL, or that are not UTF-8, round-trip through Bitmap.name."""
    path = tmp_path / "names.qcow2"
    shutil.copyfile(base_image, path)
    lay = corrupt.layout(path)
    corrupt.rewrite_directory(
        lay, [(lay.entries[0], b"", b"b0\0x"), (lay.entries[1], b"", b"\xff")]
    )
    with qbitmap.open_image(path) as image:
        names = [b.name for b in image.bitmaps]
        assert names == ["b0\x00x", "\\xff"]
        for bitmap in image.bitmaps:
            assert image.bitmap(bitmap.name) == bitmap
            assert sum(n for _, n in image.extents(bitmap.name)) == bitmap.dirty_bytes
        assert image.bitmap("b0").name == "b0\x00x"  # QEMU's name for it


def test_files_that_are_not_images(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 16))
    cases = [
        (tmp_path / "missing.qcow2", qbitmap.ImageIOError, "cannot open"),
        (tmp_path, qbitmap.ImageIOError, "is a directory"),
        (fifo, qbitmap.ImageIOError, "is a FIFO"),  # refused at once: never opened
        (raw, qbitmap.ImageFormatError, "magic"),
    ]
    for path, error, words in cases:
        with pytest.raises(error, match=words) as caught:
            qbitmap.open_image(path)
        assert caught.value.exit_code == 1


def test_a_closed_image_is_refused_like_a_closed_file(chain: Path) -> None:
    image = qbitmap.open_image(chain)
    with image:
        image.read(0, 1)
        ranges = image.extents("b0")
        assert "open" in repr(image)
    assert "closed" in repr(image)
    calls = [
        lambda: image.bitmaps,
        lambda: image.bitmap("b0"),
        lambda: image.extents("b0"),
        lambda: image.read(0, 1),
        image.writer_running,
        lambda: list(ranges),  # an iterator from before: it reads from the file
    ]
    for call in calls:
        with pytest.raises(ValueError, match="the image is closed"):
            call()
    image.close()  # twice is harmless


def _dump(path: Path) -> tuple[int, dict | None]:
    result = CliRunner().invoke(
        cli, ["dump", "--json", "--extents", str(path)], catch_exceptions=False
    )
    return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else None


def _api_view(path: Path) -> list[dict]:
    with qbitmap.open_image(path) as image:
        out = []
        names = [b.name for b in image.bitmaps]
        for bitmap in image.bitmaps:
            if names.count(bitmap.name) > 1:
                with pytest.raises(qbitmap.ImageFormatError, match="bitmaps are named"):
                    image.extents(bitmap.name, allow_stale=True)
                extents = None
            else:
                extents = list(image.extents(bitmap.name, allow_stale=True))
            out.append((bitmap, extents))
        return out


@pytest.mark.parametrize("edit", sorted(corrupt.EDITS))
def test_the_api_reads_what_dump_shows_or_raises_what_it_reports(
    base_image: Path, tmp_path: Path, edit: str
) -> None:
    """Every image of the catalogue: the same bitmaps and ranges, or a documented error."""
    path = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
    code, shown = _dump(path)
    if code != 0:
        assert code == 1
        with pytest.raises(qbitmap.QbitmapError) as caught:
            _api_view(path)
        assert caught.type in (qbitmap.ImageFormatError, qbitmap.ImageIOError)
        assert caught.value.exit_code == code
        return
    assert shown is not None
    view = _api_view(path)
    assert len(view) == len(shown["bitmaps"])
    for (bitmap, extents), theirs in zip(view, shown["bitmaps"], strict=True):
        assert (bitmap.name, bitmap.granularity, list(bitmap.flags)) == (
            theirs["name"],
            theirs["granularity"],
            theirs["flags"],
        )
        assert (bitmap.in_use, bitmap.stale, bitmap.dirty_bytes) == (
            theirs["in_use"],
            theirs["stale"],
            theirs["dirty_bytes"],
        )
        if extents is not None:
            assert extents == [(e["start"], e["length"]) for e in theirs["extents"]]


# -- memory -----------------------------------------------------------------------------------

GRANULARITY = 512
PER_DATA_CLUSTER = 65536 * 8 * GRANULARITY
CHILD = textwrap.dedent(
    """
    import json, sys
    import qbitmap
    count = 0
    with qbitmap.open_image(sys.argv[1]) as image:
        for start, length in image.extents("b0"):
            count += 1
    hwm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    print(json.dumps({"count": count, "hwm_kib": hwm}))
    """
)


def alternating(path: Path, size: int) -> Path:
    """A disk whose bitmap b0 (512 B granularity) has every other bit set: size/1 KiB ranges."""
    qemu.create_image(path, size)
    qemu.add_bitmap(path, "b0", granularity=GRANULARITY)
    # One write per data cluster's span makes QEMU allocate every data cluster.
    qemu.qemu_io_write(path, [(i, 512) for i in range(0, size, PER_DATA_CLUSTER)], unsafe=True)
    lay = corrupt.layout(path)
    for word in lay.table("b0"):
        corrupt.write_bytes(path, word & 0x00FFFFFFFFFFFE00, b"\x55" * lay.cluster_size)
    return path


def _peak(path: Path) -> tuple[int, int]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(proc.stdout)
    return result["count"], result["hwm_kib"]


@pytest.mark.slow
def test_extents_stream_in_flat_memory(tmp_path: Path) -> None:
    """Four times the ranges (8 M against 2 M) add well under the 16 bytes per range a list
    of them would hold as numpy arrays, let alone the ~100 bytes as Python tuples."""
    qemu.require_tools("qemu-img", "qemu-io")
    few, many = (alternating(tmp_path / f"alt-{n}.qcow2", n << 30) for n in (2, 8))
    few_count, few_kib = _peak(few)
    many_count, many_kib = _peak(many)
    assert (few_count, many_count) == (2 << 20, 8 << 20)
    assert many_kib - few_kib < 32 * 1024, (few_kib, many_kib)
