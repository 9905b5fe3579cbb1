"""QEMU's lock bytes: we see QEMU's, QEMU sees ours."""

from __future__ import annotations

import os

import pytest
import qemu
from store_helpers import sha

from qbitmap.errors import ExitCode, ImageBusyError
from qbitmap.lockbytes import WRITER_LOCK_BYTES, held_by_others
from qbitmap.store import ImageLock, WriteSession


def test_free_image_has_no_foreign_locks(img):
    path = img()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert held_by_others(fd) == set()
    finally:
        os.close(fd)


@pytest.mark.parametrize("read_only", [False, True])
def test_busy_while_qemu_holds_the_image(img, read_only):
    path = img()
    qemu.add_bitmap(path, "b0")
    with qemu.StorageDaemon(path, writable=not read_only, read_only=read_only):
        before = sha(path)  # after QEMU's own open-time writes (in_use flags)
        fd = os.open(path, os.O_RDONLY)
        try:
            held = held_by_others(fd)
        finally:
            os.close(fd)
        assert 201 in held and (read_only or 101 in held)
        with pytest.raises(ImageBusyError) as info, WriteSession.open(path):
            pass
        assert info.value.exit_code == ExitCode.BUSY == 75
        assert "is QEMU or another qbitmap using the image?" in str(info.value)
        assert "201" in str(info.value)
        assert sha(path) == before


def test_qemu_cannot_open_while_we_hold_the_lock(img):
    path = img()
    with WriteSession.open(path):
        assert qemu.lock_bytes_held(path) == set(WRITER_LOCK_BYTES)
        proc = qemu.qemu_img("bitmap", "--add", path, "b0", check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        proc = qemu.qemu_img("info", path, check=False)  # a reader without -U
        assert proc.returncode != 0 and "lock" in proc.stderr
        qemu.img_info(path)  # -U still works
        with pytest.raises(ImageBusyError), WriteSession.open(path):  # another qbitmap
            pass
    assert qemu.lock_bytes_held(path) == set()
    qemu.add_bitmap(path, "b0")  # free again


def test_lock_then_retest_drops_our_locks_on_conflict(img):
    path = img()
    fd1 = os.open(path, os.O_RDWR)
    fd2 = os.open(path, os.O_RDWR)
    try:
        first = ImageLock(fd1, path).acquire()
        with pytest.raises(ImageBusyError):
            ImageLock(fd2, path).acquire()
        first.release()
        assert qemu.lock_bytes_held(path) == set()
        with ImageLock(fd2, path):
            assert qemu.lock_bytes_held(path) == set(WRITER_LOCK_BYTES)
    finally:
        os.close(fd1)
        os.close(fd2)
