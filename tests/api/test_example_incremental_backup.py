"""examples/incremental-backup.py takes an incremental backup that QEMU finds identical to the disk.

The previous backup is a raw copy of the guest data (``qemu-img convert``)
taken when the bitmaps were added (``qemu-img bitmap --add``); then a guest
writes through QEMU (qemu-io on the image, or a qemu-storage-daemon that
stops cleanly and stores its bitmaps): unaligned writes, zero writes,
discards, compressed clusters, writes over data the overlay's backing file
holds, the disk's last, partial granule.  After the example, ``qemu-img
compare`` must find the backup identical to the disk (a range copied short,
misplaced or skipped fails), and the backup file may have gained data only
inside the ranges QEMU itself exports as dirty, with as many bytes copied as
QEMU counts (a range copied that was not dirty fails).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import qemu

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "incremental-backup.py"
KiB, MiB = 1 << 10, 1 << 20
# Not a multiple of either bitmap's granularity: the last granule is cut at the disk's end.
SIZE = 48 * MiB + 12 * KiB
BITMAPS = {"inc": MiB, "fine": 4 * KiB}

# Guest writes after the last backup: (qemu-io command, through a storage daemon too).
WRITES = [
    "write -P 0x41 0 512",
    "write -P 0x42 1000000 70000",  # unaligned, across a granule boundary
    "write -P 0x43 5M 4k",  # inside a range the backing file holds
    "write -z 9M 256k",  # zeros over data
    "discard 12M 64k",
    "write -P 0x44 30M 3M",
    f"write -P 0x45 {SIZE - 512} 512",  # the last, partial granule
]
# Only qemu-io can write compressed clusters.
QEMU_IO_ONLY = ["write -c -P 0x46 20M 64k"]


def run_example(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, EXAMPLE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of *path* that hold data (not holes), by SEEK_DATA and SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop))
            pos = stop
    finally:
        os.close(fd)
    return out


def inside(ranges: list[tuple[int, int]], extents: list[tuple[int, int]]) -> bool:
    """Every ``[start, stop)`` of *ranges* lies inside the union of ``(start, length)`` *extents*."""
    merged = qemu.merge_extents(extents)
    return all(
        any(s <= start and stop <= s + n for s, n in merged)
        for start, stop in ranges
        if stop > start
    )


def new_data(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges that hold data in *after* and did not in *before*."""
    out = []
    for start, stop in after:
        cuts = [(max(start, a), min(stop, b)) for a, b in before if a < stop and b > start]
        pos = start
        for a, b in sorted(cuts):
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < stop:
            out.append((pos, stop))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_disk(root: Path) -> tuple[Path, Path]:
    """A qcow2 overlay over a qcow2 base, both with data, and a raw backup of its guest data."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    base = qemu.create_image(root / "base.qcow2", SIZE)
    qemu.qemu_io(base, "write -P 0x01 0 8M", "write -P 0x02 28M 6M")
    disk = qemu.create_image(root / "disk.qcow2", None, backing=base, cluster_size=64 * KiB)
    qemu.qemu_io(disk, "write -P 0x03 2M 1M", "write -P 0x04 40M 64k")
    backup = root / "backup.raw"
    qemu.qemu_img("convert", "-O", "raw", disk, backup)
    for name, granularity in BITMAPS.items():
        qemu.add_bitmap(disk, name, granularity=granularity)
    probe = root / "probe"
    with open(probe, "wb") as f:
        f.truncate(MiB)
    qemu.require(data_ranges(probe) == [], "the filesystem under the tests reports no holes")
    probe.unlink()
    return disk, backup


def guest_writes(disk: Path, writer: str) -> None:
    if writer == "qemu-io":
        qemu.qemu_io(disk, *WRITES, *QEMU_IO_ONLY)
        return
    qemu.require_tools("qemu-storage-daemon")
    with qemu.StorageDaemon(disk) as daemon:
        qemu.qemu_io(daemon.nbd_uri, *WRITES, "flush", fmt="raw")
        daemon.stop()  # a clean close stores the bitmaps


def backup_and_judge(disk: Path, bitmap: str, previous: Path, dest: Path) -> None:
    # A sparse copy (shutil's would write every zero): data the example adds stands out.
    qemu.qemu_img("convert", "-f", "raw", "-O", "raw", previous, dest)
    before = data_ranges(dest)
    assert new_data([], before) != [(0, SIZE)], "the copy has holes"
    dirty = qemu.nbd_dirty_extents(disk, bitmap)
    assert dirty, "the guest writes dirtied the bitmap"
    result = run_example(disk, bitmap, dest)
    assert result.returncode == 0, result.stderr
    copied = sum(length for _, length in dirty)
    assert result.stdout == f"copied {copied} bytes of {bitmap!r} from {disk} to {dest}\n"
    assert qemu.qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", dest, disk).returncode == 0
    gained = new_data(before, data_ranges(dest))
    assert inside(gained, dirty), (gained, dirty)
    assert os.path.getsize(dest) == SIZE


@pytest.mark.parametrize("writer", ["qemu-io", "qemu-storage-daemon"])
@pytest.mark.parametrize("bitmap", sorted(BITMAPS))
def test_the_backup_is_the_disk(tmp_path: Path, writer: str, bitmap: str) -> None:
    disk, backup = make_disk(tmp_path)
    guest_writes(disk, writer)
    # Before the example the backup is not the disk: there is something to copy.
    assert qemu.qemu_img("compare", "-q", "-f", "raw", "-F", "qcow2", backup, disk, check=False).returncode == 1  # fmt: skip
    backup_and_judge(disk, bitmap, backup, tmp_path / "new-backup.raw")
    # The bitmap is neither cleared nor replaced: that is the backup tool's decision.
    assert qemu.nbd_dirty_extents(disk, bitmap) != []
    assert set(qemu.img_bitmaps(disk)) == set(BITMAPS)


def test_two_increments_in_a_row(tmp_path: Path) -> None:
    """The tool that owns the chain clears the bitmap after storing a backup; the next one
    builds on it."""
    disk, backup = make_disk(tmp_path)
    guest_writes(disk, "qemu-io")
    first = tmp_path / "first.raw"
    backup_and_judge(disk, "inc", backup, first)
    qemu.bitmap_op(disk, "inc", "--clear")
    qemu.qemu_io(disk, "write -P 0x51 7M 100k", "write -z 30M 64k")
    backup_and_judge(disk, "inc", first, tmp_path / "second.raw")


def test_a_crashed_bitmap_is_refused_and_nothing_written(tmp_path: Path) -> None:
    disk, backup = make_disk(tmp_path)
    qemu.crash_image(disk, [(MiB, 4096)], bitmaps=("inc",))
    before = sha(backup)
    result = run_example(disk, "inc", backup)
    assert result.returncode == 4, result.stderr
    assert "is in use" in result.stderr and result.stdout == ""
    assert sha(backup) == before


def test_a_running_vm_is_refused(tmp_path: Path) -> None:
    qemu.require_tools("qemu-storage-daemon")
    disk, backup = make_disk(tmp_path)
    before = sha(backup)
    with qemu.StorageDaemon(disk):
        result = run_example(disk, "inc", backup)
    assert result.returncode == 75 and "shut it off first" in result.stderr
    assert sha(backup) == before


def test_wrong_arguments(tmp_path: Path) -> None:
    disk, backup = make_disk(tmp_path)
    short = tmp_path / "short.raw"
    short.write_bytes(b"")
    for args, code, words in [
        ((disk, "nope", backup), 64, "no bitmap named 'nope'"),
        ((disk, "inc", short), 64, "not a raw copy"),
        ((tmp_path / "missing.qcow2", "inc", backup), 1, "cannot open"),
        ((disk, "inc", tmp_path / "missing.raw"), 1, "No such file"),
        ((disk, "inc"), 64, "usage:"),
    ]:
        result = run_example(*args)
        assert result.returncode == code and words in result.stderr, result.stderr
