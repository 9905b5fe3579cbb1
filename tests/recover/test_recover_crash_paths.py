"""Crash every recover path at every write and flush, not just full and reference recovery.

For each path -- dropping a bitmap QEMU cannot load, level recovery from a
Tracker's record, freeing leaked clusters, bringing back and dropping an
extension QEMU ignores -- recover is stopped at every operation, alternately
as a process kill (the page cache survives) and as a power loss (unflushed
writes lost, a random subset kept).  After each stop the image must be the
old one or the new one, never worse: QEMU still opens what it opened before,
qemu-img check finds no corruption, the guest data is the same, and running
recover again finishes the job.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import qemu
from recover_helpers import SIZE
from recover_helpers import clean as _clean
from recover_helpers import crash_sweep as _sweep
from recover_helpers import no_corruption as _no_corruption

from qbitmap.check import check_path
from qbitmap.recover import Options, recover
from qbitmap.track import Tracker

MiB = 1 << 20


@pytest.fixture
def crashed_with_broken(tmp_path) -> tuple[Path, Path]:
    """b0 left in use by a killed QEMU, b2 consistent but of type 2 (QEMU refuses the image)."""
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b2")
    qemu.qemu_io_write(image, [(0, MiB), (90 * MiB, 3 * MiB)], pattern=0x31)
    qemu.crash_image(image, [(8 * MiB, 4096)], bitmaps=("b0",))
    qemu.edit_bitmap_flags(image, "b2", clear_mask=1)
    expected = tmp_path / "expected.qcow2"
    qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", image, expected)
    entry = next(e for e in qemu.bitmap_directory(image) if e["name"] == "b2")
    with open(image, "r+b") as f:
        f.seek(entry["entry_offset"] + 16)
        f.write(b"\x02")
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    return image, expected


def test_drop_broken_survives_a_crash_anywhere(crashed_with_broken, tmp_path):
    image, expected = crashed_with_broken
    before = {f.code for f in check_path(image).findings if f.severity >= 3}

    def after_crash(path: Path) -> None:
        report = check_path(path)
        if report.exit_code == 2:  # before the commit: the old image, nothing new wrong
            assert {f.code for f in report.findings if f.severity >= 3} == before
        else:
            assert report.exit_code in (0, 3), [f.code for f in report.findings]
            _no_corruption(path)
            assert set(qemu.img_bitmaps(path)) == {"b0"}

    def at_the_end(path: Path) -> None:
        _clean(path)
        assert qemu.nbd_dirty_extents(path, "b0") == [(0, SIZE)]

    total = _sweep(
        image,
        Options(mode="full", drop_broken=True),
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
    )
    assert total >= 10


def _clear_autoclear_bit0(image: Path) -> None:
    with open(image, "r+b") as f:
        f.seek(88)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", word & ~1))


@pytest.fixture
def ignored(tmp_path) -> tuple[Path, Path]:
    """Two bitmaps in an extension a program without bitmap support left behind."""
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    qemu.add_bitmap(image, "b1", granularity=4096)
    qemu.qemu_io_write(image, [(0, MiB), (100 * MiB, MiB)], pattern=0x41)
    _clear_autoclear_bit0(image)
    expected = tmp_path / "expected.qcow2"
    qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", image, expected)
    return image, expected


def test_bringing_back_an_ignored_extension_survives_a_crash_anywhere(ignored, tmp_path):
    image, expected = ignored

    def after_crash(path: Path) -> None:
        _no_corruption(path)
        bitmaps = qemu.img_bitmaps(path)
        assert set(bitmaps) in (set(), {"b0", "b1"}), bitmaps  # still ignored, or all back
        assert check_path(path).exit_code in (0, 3, 4)

    def at_the_end(path: Path) -> None:
        _clean(path)
        for name in ("b0", "b1"):
            assert qemu.nbd_dirty_extents(path, name) == [(0, SIZE)]

    _sweep(
        image,
        Options(mode="full"),
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
    )


def test_dropping_an_ignored_extension_survives_a_crash_anywhere(ignored, tmp_path):
    image, expected = ignored

    def after_crash(path: Path) -> None:
        _no_corruption(path)
        assert qemu.img_bitmaps(path) == {}

    def at_the_end(path: Path) -> None:
        _clean(path)
        assert 0x23852875 not in [m for _o, m, _d in qemu.header_extensions(path)]

    _sweep(
        image,
        Options(drop_broken=True),
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
    )


def test_freeing_leaks_survives_a_crash_anywhere(tmp_path):
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x51)
    expected = tmp_path / "expected.qcow2"
    qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", image, expected)
    # Leaks as a killed writer leaves them: counted clusters nothing references, some of
    # them past the end of the file, where qemu-img check cannot see them.
    with open(image, "rb") as f:
        head = f.read(104)
    cs = 1 << struct.unpack(">I", head[20:24])[0]
    reftable = struct.unpack(">Q", head[48:56])[0]
    size = image.stat().st_size
    with open(image, "r+b") as f:
        f.seek(reftable)
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        first = -(-size // cs)
        for cluster in (first, first + 1, first + 5, first + 40):
            f.seek(block + 2 * cluster)
            f.write(struct.pack(">H", 1))
        f.truncate((first + 2) * cs)  # two of them inside the file, two past its end
    assert qemu.img_check(image)[1]["leaks"] == 2

    def after_crash(path: Path) -> None:
        _no_corruption(path)
        assert "in-use" not in qemu.img_bitmaps(path)["b0"]["flags"]

    def at_the_end(path: Path) -> None:
        _clean(path)
        again = recover(path, Options(mode="full"))
        assert again.status == "nothing-to-do" and again.leaked_clusters_reclaimed == 0

    report = recover(image, Options(mode="full", dry_run=True))
    assert report.leaked_clusters_reclaimed == 4
    _sweep(
        image,
        Options(mode="full"),
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
        commits=False,
    )


def test_level_recovery_survives_a_crash_anywhere(tmp_path):
    image = qemu.create_image(tmp_path / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    writes = [(i * 7 * MiB + 4096 * i, 4096) for i in range(30)]
    tracker = Tracker.open(image, "b0", level_bits=4)
    for off, length in writes:
        tracker.write(off, length)
    tracker.flush()
    tracker.write(200 * MiB, 4096)  # tracked, not flushed: only the record covers it
    tracker.abandon()
    expected = tmp_path / "expected.qcow2"
    qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", image, expected)
    assert check_path(image).exit_code == 4
    required = qemu.merge_extents(
        [(o // 65536 * 65536, 65536) for o, _n in writes] + [(200 * MiB, 65536)]
    )

    def covered(path: Path) -> bool:
        merged = qemu.nbd_dirty_extents(path, "b0")
        return all(any(s <= a and a + n <= s + m for s, m in merged) for a, n in required)

    def after_crash(path: Path) -> None:
        _no_corruption(path)
        flags = qemu.img_bitmaps(path)["b0"]["flags"]
        if "in-use" not in flags:
            assert covered(path)

    def at_the_end(path: Path) -> None:
        _clean(path)
        assert covered(path)
        with open(path, "rb") as f:
            f.seek(88)
            assert not struct.unpack(">Q", f.read(8))[0] >> 63  # the record is gone

    _sweep(
        image,
        Options(mode="level"),
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
    )
