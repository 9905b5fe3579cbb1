"""recover --reference pulls the head of both files into the page cache from its first instant.

The process spends its start-up importing numpy and the format layer; a
thread per file reads the head of IMAGE and FILE meanwhile, in order, into
the page cache.  The comparison claims those pulls, and asks the kernel
only for what lies past what they read.  The pulls are advice: bounded,
read-only, and they never block on or fail for an odd path.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time

import numpy as np
import pytest
from recover_helpers import run_probe, times_named

from qbitmap.recover import prefetch
from qbitmap.recover.prefetch import (
    DEFAULT_UNIT,
    Hints,
    Pull,
    claim,
    head_length,
    prefetch_heads,
    request_unit,
)

MiB = 1 << 20

# Records every pull step (sendfile, as it is asked for), every read-ahead request
# (POSIX_FADV_WILLNEED) and every read, with the file's path, every thread started, and
# the moments click and numpy start to load; then runs the command line (RUN_CLI or
# RUN_ENTRY).
PRELUDE = """
import json, os, sys, threading
events = []
lock = threading.Lock()
def path_of(fd):
    return os.readlink(f"/proc/self/fd/{fd}")
def record(*event):
    with lock:
        events.append(list(event))
real_advise, real_sendfile = os.posix_fadvise, os.sendfile
real_preadv, real_pread = os.preadv, os.pread
def advise(fd, offset, length, advice):
    if advice == os.POSIX_FADV_WILLNEED:
        record("hint", path_of(fd), offset, length)
    return real_advise(fd, offset, length, advice)
def sendfile(out_fd, in_fd, offset, count):
    record("pull", path_of(in_fd), offset, count)
    return real_sendfile(out_fd, in_fd, offset, count)
def preadv(fd, buffers, offset, *flags):
    n = real_preadv(fd, buffers, offset, *flags)
    record("read", path_of(fd), offset, n)
    return n
def pread(fd, length, offset):
    data = real_pread(fd, length, offset)
    record("read", path_of(fd), offset, len(data))
    return data
os.posix_fadvise, os.sendfile, os.preadv, os.pread = advise, sendfile, preadv, pread

real_start = threading.Thread.start
def start(thread):
    record("thread", thread.name, 0, 0)
    return real_start(thread)
threading.Thread.start = start

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "click") and not any(e[0] == name for e in events):
            record(name, "", 0, 0)
        return None
sys.meta_path.insert(0, Watch())
"""
RUN_CLI = """
from qbitmap.cli import cli
try:
    cli(sys.argv[1:], prog_name="qbitmap", standalone_mode=False)
finally:
    sys.stdout.flush()
    sys.stderr.write("EVENTS " + json.dumps(events) + "\\n")
"""
# Through the console entry point, whose fast exit is turned into an exception.
RUN_ENTRY = """
class Exit(Exception):
    pass
def fast_exit(code):
    raise Exit(code)
os._exit = fast_exit
sys.argv[0] = "qbitmap"
from qbitmap.entry import main
try:
    main()
except (SystemExit, Exit):
    pass
finally:
    sys.stdout.flush()
    sys.stderr.write("EVENTS " + json.dumps(events) + "\\n")
"""
PROBE = PRELUDE + RUN_CLI


def _events(*args: object) -> tuple[dict, list[list]]:
    return run_probe(PROBE, "EVENTS", *args)


def _evict(*paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_both_heads_are_pulled_from_the_start_and_never_asked_for_again(crashed):
    _evict(crashed.image, crashed.backup)
    report, events = _events("recover", "--json", "--reference", crashed.backup, crashed.image)
    assert report["status"] == "recovered"
    kinds = [e[0] for e in events]
    assert "numpy" in kinds
    for path in map(os.path.realpath, (crashed.image, crashed.backup)):
        size = os.path.getsize(path)
        first_pull = next(i for i, e in enumerate(events) if e[0] == "pull" and e[1] == path)
        first_read = next(i for i, e in enumerate(events) if e[0] == "read" and e[1] == path)
        # Before anything else reads the file: while the process starts.
        assert first_pull < first_read, f"{path}: read before its pull began"
        pulled = times_named(events, "pull", path, size)
        hinted = times_named(events, "hint", path, size)
        read = times_named(events, "read", path, size)
        # In order from offset 0, each byte once, no further than the head.
        reached = int(np.count_nonzero(pulled))
        assert pulled[:reached].all() and not pulled[reached:].any()
        assert pulled.max() == 1
        assert 0 < reached <= head_length(size)
        # The comparison asks only for what the pull had not reached, each byte once,
        # and only bytes it reads.
        assert not hinted[:reached].any(), f"{path}: a pulled byte asked for again"
        assert hinted.max() <= 1
        assert not np.any((hinted > 0) & (read == 0)), f"{path}: a byte asked for, never read"


def test_no_head_is_pulled_without_a_reference(crashed):
    report, events = _events("recover", "--json", "--dry-run", "--mode", "full", crashed.image)
    assert report["status"] == "dry-run"
    assert not [e for e in events if e[0] in ("pull", "hint")]


def test_odd_paths_are_passed_over(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would wait for a writer
    directory = tmp_path / "dir"
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.touch()
    before = threading.active_count()
    prefetch_heads([fifo, directory, empty, tmp_path / "missing"])
    assert threading.active_count() == before, "a pull started for what has no head"
    for path in (fifo, directory, empty):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert claim(fd) is None
        finally:
            os.close(fd)


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


def _cold_file(path, size: int) -> None:
    path.write_bytes(os.urandom(MiB) * (size // MiB))
    _evict(path)
    assert _resident(path, size).sum() < 16, "the file did not leave the page cache"


def _wait_resident(path, size: int, head: int) -> np.ndarray:
    deadline = time.monotonic() + 30
    while True:
        resident = _resident(path, size)
        if resident[: head // mmap.PAGESIZE].all() or time.monotonic() > deadline:
            return resident
        time.sleep(0.05)


def test_the_pull_reads_the_whole_head_into_the_page_cache_and_no_more(tmp_path, monkeypatch):
    head, size = 48 * MiB, 96 * MiB
    monkeypatch.setattr(prefetch, "HEAD_BYTES", head)
    path = tmp_path / "file"
    _cold_file(path, size)

    prefetch_heads([path])

    resident = _wait_resident(path, size, head)
    pages = head // mmap.PAGESIZE
    assert resident[:pages].all(), f"{pages - int(resident[:pages].sum())} pages of the head unread"
    # Bounded: the kernel's own read-ahead past the last step aside, not the whole file.
    assert resident[pages:].sum() <= (16 * MiB) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        pull = claim(fd)  # stopped: the kernel's read-ahead may be ahead of it
        assert pull is not None and 0 < pull.position <= head
        assert pull.wait(0)
        assert claim(fd) is None, "a pull handed out twice"
    finally:
        os.close(fd)


def test_a_head_the_page_cache_holds_is_not_pulled_again(tmp_path, monkeypatch):
    path = tmp_path / "file"
    path.write_bytes(os.urandom(MiB) * 24)  # written: in the page cache
    sent = []
    real_sendfile = os.sendfile

    def sendfile(out_fd, in_fd, offset, count):
        sent.append(offset)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)
    fd = os.open(path, os.O_RDONLY)
    try:
        pull = Pull(os.dup(fd), 24 * MiB)
        assert pull.wait(30)
        assert pull.position == 24 * MiB, "cached steps not counted as pulled"
        assert sent == [], "cached pages pulled again"
        os.fdatasync(fd)
        os.posix_fadvise(fd, 8 * MiB, 8 * MiB, os.POSIX_FADV_DONTNEED)  # one step evicted
        pull = Pull(os.dup(fd), 24 * MiB)
        assert pull.wait(30)
    finally:
        os.close(fd)
    assert sent == [8 * MiB], "only the evicted step is pulled"


def test_without_sendfile_the_head_is_asked_for_in_device_units(tmp_path, monkeypatch):
    """A file system that cannot sendfile: the head is asked for, a request unit at a time
    (one WILLNEED request reads at most the device's unit), and still gets read."""
    head, size = 40 * MiB, 64 * MiB
    path = tmp_path / "file"
    _cold_file(path, size)
    requests = []
    real_advise = os.posix_fadvise

    def no_sendfile(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    def advise(fd, offset, length, advice):
        requests.append((offset, length))
        return real_advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    fd = os.open(path, os.O_RDONLY)
    try:
        unit = request_unit(fd)
        pull = Pull(os.dup(fd), head)
        assert pull.wait(30)
    finally:
        os.close(fd)
    assert pull.position == 0, "asked-for bytes counted as pulled"
    assert requests == [(pos, min(unit, head - pos)) for pos in range(0, head, unit)]
    resident = _wait_resident(path, size, head)
    assert resident[: head // mmap.PAGESIZE].all()


def test_a_pull_stops_within_one_step(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PULL_BYTES", MiB)
    path = tmp_path / "file"
    _cold_file(path, 64 * MiB)
    inside, release = threading.Event(), threading.Event()
    real_sendfile = os.sendfile

    def slow_sendfile(out_fd, in_fd, offset, count):
        inside.set()
        release.wait(10)  # the first step waits until the pull is told to stop
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", slow_sendfile)
    fd = os.open(path, os.O_RDONLY)
    try:
        pull = Pull(os.dup(fd), 64 * MiB)
        assert inside.wait(10)
        threading.Timer(0.2, release.set).start()
        pull.stop()
    finally:
        os.close(fd)
    assert pull.wait(0)
    assert pull.position == MiB, "the pull went on past the step it was in"


def test_the_head_takes_a_bounded_share_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(prefetch, "available_memory", lambda: 64 * prefetch.MEMORY_SHARE * MiB)
    assert head_length(10 << 30) == 64 * MiB
    assert head_length(5 * MiB) == 5 * MiB
    monkeypatch.setattr(prefetch, "available_memory", lambda: None)
    assert head_length(10 << 30) == prefetch.HEAD_BYTES
    monkeypatch.undo()
    memory = prefetch.available_memory()
    assert memory is None or memory > 0


def test_hints_are_asked_for_in_order_off_the_caller_and_dropped_at_close(tmp_path, monkeypatch):
    path = tmp_path / "file"
    _cold_file(path, 16 * MiB)
    asked = []
    callers = set()
    gate = threading.Event()
    real_advise = os.posix_fadvise

    def advise(fd, offset, length, advice):
        gate.wait(10)
        callers.add(threading.current_thread().name)
        asked.append((offset, length))
        return real_advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    fd = os.open(path, os.O_RDONLY)
    try:
        hints = Hints(2 * MiB)
        hints.ask(fd, 0, 3 * MiB)  # the thread blocks in its first request
        hints.ask(fd, 8 * MiB, 9 * MiB)
        assert asked == [], "the caller waited for a request"
        gate.set()
        deadline = time.monotonic() + 10
        while len(asked) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert asked == [(0, 2 * MiB), (2 * MiB, MiB), (8 * MiB, MiB)]
        assert callers == {"qbitmap-hints"}
        gate.clear()
        hints.ask(fd, 12 * MiB, 13 * MiB)  # blocks the thread again
        hints.ask(fd, 14 * MiB, 15 * MiB)  # never asked for: dropped by close
        threading.Timer(0.2, gate.set).start()
        hints.close()
        assert (14 * MiB, MiB) not in asked
        hints.ask(fd, 15 * MiB, 16 * MiB)  # after close: nothing
        assert (15 * MiB, MiB) not in asked
    finally:
        os.close(fd)


@pytest.mark.parametrize("error", [errno.EINVAL, errno.ESPIPE])
def test_a_file_that_takes_no_advice_is_read_without_it(tmp_path, monkeypatch, error):
    path = tmp_path / "file"
    _cold_file(path, 4 * MiB)
    calls = []

    def refuse(fd, offset, length, advice):
        calls.append(offset)
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    fd = os.open(path, os.O_RDONLY)
    try:
        hints = Hints(MiB)
        hints.ask(fd, 0, 2 * MiB)
        hints.ask(fd, 2 * MiB, 4 * MiB)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        hints.close()
    finally:
        os.close(fd)
    assert calls == [0], "asked again after the file refused advice"


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


@pytest.mark.parametrize(
    ("args", "files"),
    [
        (["recover", "--reference", "ref", "img"], ("img", "ref")),
        (["recover", "img", "--reference=ref"], ("img", "ref")),
        (
            ["-q", "--no-color", "recover", "--json", "-b", "daily", "--reference", "r", "i"],
            ("i", "r"),
        ),
        (
            ["recover", "--mode", "reference", "--bitmap=d", "--reference", "r", "--", "-i"],
            ("-i", "r"),
        ),
        (
            [
                "recover",
                "--reference-format",
                "raw",
                "--output",
                "json",
                "-n",
                "--reference",
                "r",
                "i",
            ],
            ("i", "r"),
        ),
        (["recover", "img"], None),  # no reference: nothing to pull
        (["recover", "--reference", "ref"], None),  # no image
        (["recover", "--reference", "ref", "a", "b"], None),  # two images: click's error
        (["recover", "--help", "--reference", "ref", "img"], None),
        (["recover", "-nb", "x", "--reference", "ref", "img"], None),  # combined: not read
        (["recover", "--unknown", "--reference", "ref", "img"], None),
        (["recover", "--reference"], None),
        (["-V", "recover", "--reference", "ref", "img"], None),
        (["check", "--reference", "ref", "img"], None),
        (["dump", "recover"], None),
        ([], None),
    ],
)
def test_recover_files_reads_only_command_lines_it_fully_understands(args, files):
    assert prefetch.recover_files(args) == files


def test_the_pulls_start_before_click_is_imported(crashed):
    _evict(crashed.image, crashed.backup)
    report, events = run_probe(
        PRELUDE + RUN_ENTRY,
        "EVENTS",
        "recover",
        "--json",
        "--reference",
        crashed.backup,
        crashed.image,
    )
    assert report["status"] == "recovered"
    kinds = [e[0] for e in events]
    click = kinds.index("click")
    for path in map(os.path.realpath, (crashed.image, crashed.backup)):
        pulls = [i for i, e in enumerate(events) if e[0] == "pull" and e[1] == path]
        assert pulls, f"{path}: not pulled"
        # Each file is pulled by one thread only: the command's own start finds it started.
        assert sorted(e[2] for e in events if e[0] == "pull" and e[1] == path) == [
            e[2] for e in events if e[0] == "pull" and e[1] == path
        ]
    # Both pulls' threads run before click loads, and are reading before numpy does.
    threads = [i for i, e in enumerate(events) if e[:2] == ["thread", "qbitmap-pull"]]
    assert len(threads) == 2 and max(threads) < click
    first = min(i for i, e in enumerate(events) if e[0] == "pull")
    assert first < kinds.index("numpy")


def test_a_comparison_closed_unstarted_still_stops_the_start_up_pulls(crashed):
    from qbitmap.recover.reference import Comparison

    prefetch_heads([crashed.image, crashed.backup])
    size = os.path.getsize(crashed.image)
    with Comparison(crashed.image, crashed.backup, virtual_size=size):
        pass  # refused before it compared, say
    for path in (crashed.image, crashed.backup):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert claim(fd) is None, f"{path}: its pull was left running"
        finally:
            os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "qbitmap-pull"]
