"""recover --reference asks the kernel for the head of both files before its heavy imports.

The process spends its start-up importing numpy and the format layer; the
disks read the first bytes of IMAGE and FILE meanwhile.  The request is
advice: bounded, read-only, and it never blocks on or fails for an odd path.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

import numpy as np
from recover_helpers import run_probe

from qbitmap.recover.prefetch import DEFAULT_UNIT, HEAD_BYTES, prefetch_heads, request_unit

# Records every POSIX_FADV_WILLNEED request (path, offset, length) and the moment numpy is
# first imported, then runs the command line.
PROBE = """
import json, os, sys
events = []
real_advise = os.posix_fadvise
def advise(fd, offset, length, advice):
    if advice == os.POSIX_FADV_WILLNEED:
        events.append(["willneed", os.readlink(f"/proc/self/fd/{fd}"), offset, length])
    return real_advise(fd, offset, length, advice)
os.posix_fadvise = advise

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not any(e[0] == "numpy" for e in events):
            events.append(["numpy", "", 0, 0])
        return None
sys.meta_path.insert(0, Watch())
from qbitmap.cli import cli
try:
    cli(sys.argv[1:], prog_name="qbitmap", standalone_mode=False)
finally:
    sys.stdout.flush()
    sys.stderr.write("EVENTS " + json.dumps(events) + "\\n")
"""


def _events(*args: object) -> tuple[dict, list[list]]:
    return run_probe(PROBE, "EVENTS", *args)


def test_both_heads_are_asked_for_before_numpy_loads(crashed):
    report, events = _events(
        "recover", "--json", "--dry-run", "--reference", crashed.backup, crashed.image
    )
    assert report["status"] == "dry-run"
    kinds = [e[0] for e in events]
    assert "numpy" in kinds
    before = events[: kinds.index("numpy")]
    wanted = {
        (os.path.realpath(p), 0, min(HEAD_BYTES, os.path.getsize(p)))
        for p in (crashed.image, crashed.backup)
    }
    assert {(path, offset, length) for _, path, offset, length in before} == wanted


def test_no_head_is_asked_for_without_a_reference(crashed):
    report, events = _events("recover", "--json", "--dry-run", "--mode", "full", crashed.image)
    assert report["status"] == "dry-run"
    heads = [e for e in events if e[0] == "willneed" and e[2] == 0 and e[3] > 0]
    assert not [e for e in heads if e[1] == os.path.realpath(crashed.image)]


def test_odd_paths_are_passed_over(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would wait for a writer
    directory = tmp_path / "dir"
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.touch()
    prefetch_heads([fifo, directory, empty, tmp_path / "missing"])


def _resident(path, length: int) -> np.ndarray:
    """Which pages of the first *length* bytes of *path* are in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    vec = (ctypes.c_ubyte * (-(-length // mmap.PAGESIZE)))()
    with open(path, "rb") as f:
        # A private writable mapping, so that ctypes can take its address; nothing is written.
        mm = mmap.mmap(f.fileno(), length, flags=mmap.MAP_PRIVATE)
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            rc = libc.mincore(ctypes.addressof(anchor), length, vec)
            del anchor
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            mm.close()
    return np.frombuffer(bytes(vec), dtype=np.uint8) & 1


def test_the_whole_head_is_read_not_just_one_request(tmp_path):
    """One WILLNEED request reads at most the device's unit: the head is asked for in pieces."""
    size = HEAD_BYTES + (8 << 20)
    path = tmp_path / "file"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (size >> 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert _resident(path, size).sum() < 16, "the file did not leave the page cache"

    prefetch_heads([path])

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resident = _resident(path, size)
        if resident[: HEAD_BYTES // mmap.PAGESIZE].all():
            break
        time.sleep(0.05)
    pages = HEAD_BYTES // mmap.PAGESIZE
    assert resident[:pages].all(), f"{pages - int(resident[:pages].sum())} pages of the head unread"
    # Bounded: the kernel's own read-ahead aside, not the whole file.
    assert resident[pages:].sum() < (8 << 20) // mmap.PAGESIZE


def test_request_unit_follows_the_device(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"x")
    dev = os.stat(path).st_dev
    queue = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue"
    fd = os.open(path, os.O_RDONLY)
    try:
        unit = request_unit(fd)
    finally:
        os.close(fd)
    if os.path.isdir(queue):
        with open(f"{queue}/read_ahead_kb") as f:
            read_ahead = int(f.read()) << 10
        assert unit >= min(read_ahead, 16 << 20)
    # No block device behind a pipe: the default.
    r, w = os.pipe()
    try:
        assert request_unit(r) == DEFAULT_UNIT
    finally:
        os.close(r)
        os.close(w)
