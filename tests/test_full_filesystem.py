"""A full filesystem: reading a hole must not kill qbitmap (a mapping turns that into SIGBUS).

On a tmpfs at its size limit, touching a hole of a file through a shared
mapping needs a new page and raises SIGBUS; ``pread`` of the same hole reads
zeros.  Both check (L2 tables) and recover --reference (guest data) read
holes here.  Needs root to mount the tmpfs (CI runs as root).
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import qemu

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            raise RuntimeError("this test mounts a tmpfs and must run as root in CI")
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _punch(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, flags, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
    finally:
        os.close(fd)


def _fill(mnt: Path) -> None:
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(MiB))
                f.flush()
        except OSError:
            pass


def _qbitmap(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_reads_an_l2_table_that_is_a_hole_on_a_full_filesystem(small_fs):
    image = qemu.create_image(small_fs / "d.qcow2", 64 * MiB)
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io(image, "write -P 0x33 1M 64k")
    with open(image, "rb") as f:
        l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    _punch(image, l2, 65536)  # the L2 table is now a hole: zeros, no page
    _fill(small_fs)
    proc = _qbitmap("check", "--json", image)
    assert proc.returncode == 3, (proc.returncode, proc.stderr)  # not -7 (SIGBUS)
    assert "Traceback" not in proc.stderr


def test_recover_compares_with_a_reference_whose_data_is_a_hole_on_a_full_filesystem(
    small_fs, tmp_path
):
    image = qemu.create_image(tmp_path / "d.qcow2", 8 * MiB)
    qemu.qemu_io(image, "write -P 0 2M 1M")  # data (of zeros) at 2M
    qemu.add_bitmap(image, "b0")
    qemu.crash_image(image, [(3 * MiB, 4096)], bitmaps=("b0",))
    reference = small_fs / "backup.qcow2"
    qemu.qemu_img("convert", "-O", "qcow2", "-S", "0", image, reference)
    # The reference's data clusters become holes its L2 table still points at.
    with open(reference, "rb") as f:
        size = f.seek(0, 2)
    _punch(reference, 5 * 65536, size - 5 * 65536)  # header, refcounts, L1, L2 stay
    _fill(small_fs)
    proc = _qbitmap("recover", "--json", "--reference", reference, image)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    dirty = qemu.nbd_dirty_extents(image, "b0")
    assert (3 * MiB, 64 * 1024) in dirty
