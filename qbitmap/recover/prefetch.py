"""Getting both files of ``recover --reference`` into the page cache before they are compared.

A ``recover --reference`` process spends its first few hundred milliseconds
importing numpy and the format layer and opening the image; with both
files cold on disk, the disks would idle all that time.
:func:`prefetch_heads` is called before any of that: it starts one thread
per file that *pulls* the file's head -- its first :func:`head_length`
bytes -- into the page cache, in order, and returns at once, so that the
start-up and the disks' reads overlap.  The head of a qcow2 file is where
QEMU puts the metadata the check reads first, and the data written first
follows it.  Once the comparison knows which bytes it reads, and in which
order, it takes over: :class:`qbitmap.recover.reference.ReadAhead`
*claims* each pull (:func:`claim` stops it and says how far it got) and
has :class:`Hints` ask the kernel for the rest, in the order it reads it.

A pull copies the file to ``/dev/null`` with ``sendfile``, in order, in
:data:`PULL_BYTES` steps.  That is a plain sequential read inside the
kernel, and Linux reads ahead of it with its own read-ahead, in large
pages: on the disks ``bench/bench_recover.py`` runs on, that fills the page
cache about twice as fast as ``POSIX_FADV_WILLNEED`` requests for the same
bytes, and a thread of its own hides that a request blocks while the
device's queue is full.  Where ``sendfile`` does not work (a file system
without it), the pull asks with ``POSIX_FADV_WILLNEED`` instead, a
:func:`request_unit` at a time: Linux reads at most the larger of the
device's read-ahead window and its largest request for one such call and
drops the rest of the range.

A speed trick, in this one place, with this contract:

* It reads nothing into the process but one-byte probes of whether a step
  is cached already: the bytes go from the page cache to ``/dev/null``
  inside the kernel.  The page cache it fills is bounded:
  at most :data:`HEAD_BYTES` per file, and at most 1/:data:`MEMORY_SHARE` of
  the memory the kernel reports available, whatever the size of the files.
* It is advice: every byte used is read again with ``pread`` by the code
  that uses it (from the cache if the pull got there first), so no result
  depends on it, and it never fails: a path it cannot open or that is not a
  regular file is passed over, an error ends the pull quietly, and the real
  open reports the error.
* It opens without blocking (``O_NONBLOCK``: a FIFO does not wait for a
  writer), only reads, takes no lock and writes nothing.  Each pull owns a
  duplicate of its file descriptor, so closing the caller's is safe; a
  pull stops within one step of :meth:`Pull.stop`, and its thread is a
  daemon that never keeps the process alive.

Standard library only: it runs before the heavy imports it overlaps.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import deque
from collections.abc import Iterable, Sequence

#: Bytes of each file pulled at most: a bound on the page cache a pull fills.  The
#: comparison claims (stops) a pull once it knows its plan, usually well before.
HEAD_BYTES = 1 << 30
#: A pull takes at most this share (1/N) of the memory the kernel reports available.
MEMORY_SHARE = 16
#: Bytes of one ``sendfile`` step: a pull checks whether it is to stop between two.
PULL_BYTES = 8 << 20
#: A request, when the device does not say how much one may be.
DEFAULT_UNIT = 1 << 20
_UNIT_RANGE = (128 << 10, 16 << 20)


def request_unit(fd: int) -> int:
    """The most one ``POSIX_FADV_WILLNEED`` call reads from *fd*'s device, in bytes.

    The larger of the block device's ``read_ahead_kb`` and ``max_sectors_kb``
    (a partition's come from its disk); :data:`DEFAULT_UNIT` where there is
    no block device to ask (tmpfs, network file systems).
    """
    try:
        dev = os.fstat(fd).st_dev
    except OSError:
        return DEFAULT_UNIT
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    found = []
    for queue in ("queue", "../queue"):
        for name in ("read_ahead_kb", "max_sectors_kb"):
            try:
                with open(os.path.join(base, queue, name)) as f:
                    found.append(int(f.read()) << 10)
            except (OSError, ValueError):
                pass
    if not found:
        return DEFAULT_UNIT
    low, high = _UNIT_RANGE
    return max(low, min(high, max(found)))


def advise_willneed(fd: int, start: int, end: int, unit: int) -> None:
    """Ask the kernel to read ``[start, end)`` of *fd*, *unit* bytes per request.

    Raises OSError as ``posix_fadvise`` does (a file that takes no advice).
    """
    for pos in range(start, end, unit):
        os.posix_fadvise(fd, pos, min(unit, end - pos), os.POSIX_FADV_WILLNEED)


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where the kernel does not say."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def head_length(size: int) -> int:
    """Bytes of a regular file of *size* bytes that a pull reads: its head."""
    limit = HEAD_BYTES
    memory = available_memory()
    if memory is not None:
        limit = min(limit, memory // MEMORY_SHARE)
    return max(0, min(size, limit))


# A read that takes only what the page cache holds (Linux 4.14+).
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _cached(fd: int, start: int, length: int) -> bool:
    """Whether the page cache holds the first and the last byte of ``[start, start + length)``:
    a step read before holds both (each probe reads one byte, and never waits)."""
    if not _NOWAIT:
        return False
    probe = bytearray(1)
    try:
        for pos in (start, start + length - 1):
            if os.preadv(fd, [probe], pos, _NOWAIT) != 1:
                return False
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the file cannot tell
        return False
    return True


class Pull:
    """One file's head being read into the page cache, in order, by a thread of its own."""

    def __init__(self, fd: int, length: int) -> None:
        """Start pulling ``[0, length)`` of *fd*, a descriptor the pull owns from here on."""
        self.length = length  # bytes of the head, from offset 0
        self.position = 0  # bytes from offset 0 on pulled so far (one writer: the thread)
        self._fd = fd  # a duplicate owned by the thread, closed when it ends
        self._stop = threading.Event()
        self._begun = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qbitmap-pull", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # RuntimeError: no thread can be started
            os.close(fd)
            raise
        # Returned once the thread is reading: the caller's next work competes with the
        # disk, not with the thread's start.
        self._begun.wait(1.0)

    def _run(self) -> None:
        fd = self._fd
        try:
            self._begun.set()
            if not self._send(fd):
                self._advise(fd)
        except Exception:  # noqa: BLE001, S110 - advice: the real reads report errors
            pass
        finally:
            os.close(fd)

    def _send(self, fd: int) -> bool:
        """Pull with ``sendfile`` to ``/dev/null``; False where it does not work."""
        try:
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            while self.position < self.length and not self._stop.is_set():
                step = min(PULL_BYTES, self.length - self.position)
                if _cached(fd, self.position, step):
                    self.position += step  # warm: walking the cached pages gains nothing
                    continue
                n = os.sendfile(null, fd, self.position, step)
                if n <= 0:
                    break  # the file ended
                self.position += n
        except OSError:
            return self.position > 0  # no sendfile from this file: ask for the head instead
        finally:
            os.close(null)
        return True

    def _advise(self, fd: int) -> None:
        """Ask for the head, a :func:`request_unit` at a time; the kernel reads it later,
        so nothing counts as pulled."""
        unit = request_unit(fd)
        pos = 0
        while pos < self.length and not self._stop.is_set():
            end = min(self.length, pos + unit)
            os.posix_fadvise(fd, pos, end - pos, os.POSIX_FADV_WILLNEED)
            pos = end

    def stop(self, timeout: float | None = None) -> None:
        """Stop at the next step and wait for the thread to end (at most *timeout* s)."""
        self._stop.set()
        self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the pull to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


# Pulls started by prefetch_heads and not yet claimed, by (st_dev, st_ino).
_started: dict[tuple[int, int], Pull] = {}
_started_lock = threading.Lock()


def claim(fd: int) -> Pull | None:
    """The pull :func:`prefetch_heads` started for *fd*'s file, stopped (handed out once:
    its :attr:`Pull.position` is then final); None if there is none."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    with _started_lock:
        pull = _started.pop((st.st_dev, st.st_ino), None)
    if pull is not None:
        pull.stop()
    return pull


def prefetch_heads(paths: Iterable[os.PathLike[str] | str]) -> None:
    """Start pulling the head of each regular file of *paths* (:class:`Pull`), and return.

    A file whose pull is started already (and not claimed) is passed over.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            length = head_length(st.st_size) if stat.S_ISREG(st.st_mode) else 0
            with _started_lock:
                if (st.st_dev, st.st_ino) in _started:
                    length = 0
            if length <= 0:
                continue
            os.set_blocking(fd, True)  # a regular file: the pull's reads may wait
            pull = Pull(os.dup(fd), length)
        except (OSError, RuntimeError):  # RuntimeError: no thread can be started
            continue
        finally:
            os.close(fd)
        with _started_lock:
            _started[(st.st_dev, st.st_ino)] = pull


# The command line, as far as recover_files reads it: qbitmap's own flags, and recover's
# options that take a value and those that do not.
_GLOBAL_FLAGS = frozenset(("--color", "--no-color", "-q", "--quiet", "--debug"))
_RECOVER_VALUES = frozenset(
    ("-b", "--bitmap", "--mode", "--reference", "--reference-format", "--output")
)
_RECOVER_FLAGS = frozenset(("--drop-broken", "--keep-leaks", "--dry-run", "-n", "--json"))


def recover_files(args: Sequence[str]) -> tuple[str, str] | None:
    """IMAGE and FILE of a ``qbitmap recover --reference FILE IMAGE`` command line (*args*:
    ``sys.argv[1:]``), read before click is even imported; None for anything else.

    It reads only what it fully understands -- qbitmap's flags, then
    ``recover`` with its own options, one IMAGE and a ``--reference`` -- and
    answers None at the first thing it does not (``--help``, a combined short
    option, a second argument): the command then starts the pulls itself
    once click has parsed the line.  A wrong answer could only pull a file
    the command does not read.
    """
    it = iter(args)
    for arg in it:
        if arg == "recover":
            break
        if arg not in _GLOBAL_FLAGS:
            return None
    else:
        return None
    reference: str | None = None
    positional: list[str] = []
    for arg in it:
        if arg == "--":
            positional.extend(it)
            break
        name, eq, value = arg.partition("=")
        if name in _RECOVER_VALUES and name.startswith("--"):  # --name VALUE, --name=VALUE
            if not eq:
                following = next(it, None)
                if following is None:
                    return None
                value = following
            if name == "--reference":
                reference = value
        elif arg in _RECOVER_VALUES:  # -b VALUE
            if next(it, None) is None:
                return None
        elif arg in _RECOVER_FLAGS:
            pass
        elif arg.startswith("-") and arg != "-":
            return None
        else:
            positional.append(arg)
    if reference is None or len(positional) != 1:
        return None
    return positional[0], reference


def prefetch_command_line(args: Sequence[str]) -> None:
    """Start the pulls of a ``recover --reference`` command line (:func:`recover_files`)."""
    files = recover_files(args)
    if files is not None:
        prefetch_heads(files)


class Hints:
    """``POSIX_FADV_WILLNEED`` requests made by a thread of their own, in the order given.

    A request blocks its caller while the device's queue is full; here that
    is this thread, not the one that plans the reads.  The ranges' file
    descriptors must stay open until :meth:`close` returns.
    """

    def __init__(self, most: int) -> None:
        self._most = most  # bytes of one request at most (less where the device's unit is less)
        self._ranges: deque[tuple[int, int, int]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._failed: set[int] = set()  # descriptors that take no advice
        self._units: dict[int, int] = {}
        self._thread: threading.Thread | None = None

    def ask(self, fd: int, start: int, end: int) -> None:
        """Have ``[start, end)`` of *fd* asked for, after the ranges asked before."""
        with self._cond:
            if self._closed:
                return
            self._ranges.append((fd, start, end))
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qbitmap-hints", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ranges and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                fd, start, end = self._ranges.popleft()
            if fd in self._failed:
                continue
            unit = self._units.get(fd) or self._units.setdefault(fd, request_unit(fd))
            try:
                advise_willneed(fd, start, end, min(unit, self._most))
            except OSError:
                self._failed.add(fd)  # advice the file does not take: read without it

    def close(self) -> None:
        """Drop the ranges not asked for yet and wait for the thread to end."""
        with self._cond:
            self._closed = True
            self._ranges.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


__all__ = [
    "DEFAULT_UNIT",
    "HEAD_BYTES",
    "MEMORY_SHARE",
    "PULL_BYTES",
    "Hints",
    "Pull",
    "advise_willneed",
    "available_memory",
    "claim",
    "head_length",
    "prefetch_command_line",
    "prefetch_heads",
    "recover_files",
    "request_unit",
]
