"""Which granules differ between the image's guest data and a reference copy.

The reference is the guest data as of the bitmap's last clear point (the
last backup).  Every granule whose bytes differ between IMAGE and FILE
changed since then, so OR-ing those granules into the on-disk bitmap gives
an exact recovery.

Allocation maps are compared first (:class:`qbitmap.format.guest.GuestDisk`
resolves both backing chains): ranges that are zero on both sides, or that
both sides take from the same bytes of the same file (a shared backing
file), are never read.  The rest is planned as a stream of tasks of up to
:data:`CHUNK_BYTES` of guest data, in guest order; :class:`ReadAhead` has
the kernel fetch what the next tasks read from both files at once, and
:func:`qbitmap.parallel.ordered_map`'s workers read and compare each task
:data:`BLOCK_BYTES` at a time (``pread`` into two small reused buffers,
``memcmp``).  Nothing grows with the size of the disks but the bitmap.
Bytes past the end of the shorter disk compare as zeros.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Self

import numpy as np

from qbitmap.errors import ImageFormatError, UnsupportedImageError, UsageError
from qbitmap.format.bitmap import group_any, popcount, unique_sorted
from qbitmap.format.guest import COMPRESSED, ZERO, GuestDisk, ReadStats, Segment
from qbitmap.parallel import ordered_map
from qbitmap.recover.prefetch import Hints, claim

CHUNK_BYTES = 16 << 20  # guest bytes of one task: one worker's turn (fewer hand-offs)
BLOCK_BYTES = 1 << 20  # bytes of each side read and compared at a time: in the cache
TASK_PIECES = 256  # pieces in one task at most, however small they are
READAHEAD_BYTES = 128 << 20  # file bytes per side the kernel is asked to fetch ahead
READAHEAD_TASKS = 64  # planned tasks held ahead at most
HINT_BYTES = 2 << 20  # one read-ahead request at most (less where the device's unit is less)
QUIET_BYTES = 128 << 20  # reads without a wait after which read-ahead pauses


def _load_memcmp() -> Any:
    """libc's memcmp through ctypes (it releases the GIL); None where there is no libc."""
    try:
        import ctypes

        fn = ctypes.CDLL(None).memcmp
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        return fn
    except (OSError, AttributeError, ImportError):  # pragma: no cover - non-glibc platforms
        return None


_MEMCMP = _load_memcmp()
_ZEROS = np.zeros(BLOCK_BYTES, dtype=np.uint8)
_ZEROS.flags.writeable = False


def _equal(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two equally long uint8 arrays hold the same bytes (memcmp speed)."""
    if _MEMCMP is not None:
        return bool(_MEMCMP(x.ctypes.data, y.ctypes.data, len(x)) == 0)
    return bool(np.array_equal(x, y))


class Progress(Protocol):
    def advance(self, amount: int) -> None: ...


class _NoProgress:
    def advance(self, amount: int) -> None:
        return None


@dataclass
class DiffStats:
    """What the comparison did (JSON report, benchmark, tests)."""

    virtual_size: int = 0
    compared_bytes: int = 0  # guest bytes that had to be looked at
    skipped_bytes: int = 0  # guest bytes equal by allocation map alone
    image_bytes_read: int = 0  # file bytes read from the image chain
    reference_bytes_read: int = 0  # file bytes read from the reference chain
    differing_granules: int = 0
    reference_size: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Piece(NamedTuple):
    """A guest range where one segment of each side must be compared (a named tuple, as
    :class:`~qbitmap.format.guest.Segment` is: one is made per segment while planning)."""

    start: int
    end: int
    a: Segment
    b: Segment

    def cut(self, start: int, end: int) -> Piece:
        if start == self.start and end == self.end:
            return self
        return Piece(start, end, self.a.cut(start, end), self.b.cut(start, end))


def pieces(image: GuestDisk, reference: GuestDisk, size: int, stats: DiffStats) -> Iterator[Piece]:
    """Pair up both allocation maps over ``[0, size)``; skip ranges known equal."""
    a_iter = image.segments(0, size)
    b_iter = reference.segments(0, size)
    a = next(a_iter, None)
    b = next(b_iter, None)
    while a is not None and b is not None:
        start = max(a.start, b.start)
        end = min(a.end, b.end)
        if start < end:
            sa = a.cut(start, end)
            sb = b.cut(start, end)
            if sa.same_bytes_as(sb):
                stats.skipped_bytes += end - start
            else:
                yield Piece(start, end, sa, sb)
        if a.end <= end:
            a = next(a_iter, None)
        if b.end <= end:
            b = next(b_iter, None)


@dataclass(frozen=True, slots=True)
class Task:
    """Consecutive pieces (or parts of one) that one worker compares in one turn."""

    parts: tuple[Piece, ...]

    @property
    def end(self) -> int:
        return self.parts[-1].end

    @property
    def length(self) -> int:
        return sum(p.end - p.start for p in self.parts)


def _one_cluster(x: Segment, y: Segment) -> bool:
    """Whether two consecutive segments read the same compressed cluster."""
    return x.kind == COMPRESSED and y.kind == COMPRESSED and x.layer is y.layer and x.host == y.host


def plan(work: Iterator[Piece]) -> Iterator[Task]:
    """The pieces as tasks of about :data:`CHUNK_BYTES`, in guest order.

    Longer pieces are cut at multiples of :data:`CHUNK_BYTES`; a task never
    ends between two parts that read one compressed cluster, so that the
    cluster is read and inflated once, by one worker.
    """
    batch: list[Piece] = []
    size = 0
    for piece in work:
        pos = piece.start
        while pos < piece.end:
            end = min(piece.end, (pos // CHUNK_BYTES + 1) * CHUNK_BYTES)
            part = piece.cut(pos, end)
            if (size >= CHUNK_BYTES or len(batch) >= TASK_PIECES) and not (
                _one_cluster(batch[-1].a, part.a) or _one_cluster(batch[-1].b, part.b)
            ):
                yield Task(tuple(batch))
                batch, size = [], 0
            batch.append(part)
            size += end - pos
            pos = end
    if batch:
        yield Task(tuple(batch))


class ReadAhead:
    """Tasks, in order, with the kernel asked to fetch the bytes of the next ones first.

    The one speed trick of the comparison.  Its contract:

    * It names only bytes the comparison itself reads -- each task's data
      runs and compressed clusters, nothing of what the allocation maps let
      it skip -- each range once, in the order the tasks read them.  So the
      kernel fetches no byte that would not be read anyway, and none twice.
    * It reads nothing into the process: ``posix_fadvise(POSIX_FADV_WILLNEED)``
      starts the kernel's own reads into the page cache and returns.  At most
      :data:`READAHEAD_BYTES` per side (plus one task) are asked for ahead of
      the task handed out, and at most :data:`READAHEAD_TASKS` planned tasks
      are held, so neither the page cache it fills nor the process's memory
      grows with the disks.
    * The requests are made by a thread of their own
      (:class:`qbitmap.recover.prefetch.Hints`), in the order planned: a
      request blocks while the device's queue is full, and the workers
      compare meanwhile.  :meth:`close` drops what is not asked for yet and
      waits for that thread, before the files may be closed.
    * It is advice: the bytes compared are read by the workers with
      ``pread`` whatever happens to a hint, so the result never depends on it.
      A failing plan (an unreadable L2 table) is raised when the tasks before
      it have been handed out, as without it.
    * Both sides are asked for together, so both files are read at once, in
      requests as large as their ranges allow (:data:`HINT_BYTES` at a time,
      or the device's own unit where that is less: the kernel drops what one
      request asks beyond it, :func:`qbitmap.recover.prefetch.request_unit`).
    * The one exception: what ``recover``'s start-up pull
      (:func:`qbitmap.recover.prefetch.prefetch_heads`) read of a top file,
      from offset 0 on, is in the page cache already and never asked for
      here.  The window claims the pull (:func:`qbitmap.recover.prefetch.claim`),
      which stops it: from then on the storage reads in the order the tasks
      do, and no byte is asked for twice.
    * It asks only while the cache is cold: after :data:`QUIET_BYTES` of
      planned reads during which no read had to wait for the storage
      (``ReadStats.waits``), it stops asking -- a hint for cached bytes costs
      a page-cache walk and gains nothing -- and starts again, with the
      tasks already planned, at the next read that waits.

    Not thread-safe: :func:`qbitmap.parallel.ordered_map` reads it from one
    thread at a time.
    """

    def __init__(
        self, tasks: Iterator[Task], stats: tuple[ReadStats, ...], tops: tuple[int, ...] = ()
    ) -> None:
        self._tasks = tasks
        self._stats = stats
        self._tops = tops  # file descriptors whose start-up pull is claimed
        self._heads: dict[int, int] = {}  # file descriptor -> bytes pulled from offset 0
        # (task, file bytes of side a, of side b, ranges not asked for yet)
        self._queue: deque[tuple[Task, int, int, list[list[int]]]] = deque()
        self._ahead = [0, 0]  # file bytes of the queued tasks, per side
        self._done = False
        self._error: Exception | None = None
        self._hints = Hints(HINT_BYTES) if hasattr(os, "posix_fadvise") else None
        self._waits = -1  # reads that waited, when last looked at (-1: never: cold)
        self._quiet = 0  # file bytes planned since then

    def __iter__(self) -> ReadAhead:
        return self

    def start(self) -> None:
        """Plan the first tasks and ask for their bytes, before the first is taken."""
        if not self._done:
            self._fill()

    def __next__(self) -> Task:
        if not self._done:
            self._fill()
        if not self._queue:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration
        task, a, b, _ranges = self._queue.popleft()
        self._ahead[0] -= a
        self._ahead[1] -= b
        return task

    def _claim_heads(self) -> None:
        tops, self._tops = self._tops, ()
        for fd in tops:
            pull = claim(fd)
            if pull is not None:
                self._heads[fd] = pull.position

    def close(self) -> None:
        """Stop asking (the requests' thread ends) and stop the start-up pulls not claimed yet;
        the files may be closed then."""
        if self._tops:
            self._claim_heads()
        if self._hints is not None:
            self._hints.close()

    def _fill(self) -> None:
        if self._tops:
            self._claim_heads()
        planned = 0
        while not self._queue or (
            len(self._queue) < READAHEAD_TASKS and max(self._ahead) < READAHEAD_BYTES
        ):
            try:
                task = next(self._tasks)
            except StopIteration:
                self._done = True
                break
            except Exception as exc:  # noqa: BLE001 - raised in order by __next__
                self._error = exc
                self._done = True
                break
            sizes, ranges = _file_ranges(task, self._heads)
            self._queue.append((task, sizes[0], sizes[1], ranges))
            self._ahead[0] += sizes[0]
            self._ahead[1] += sizes[1]
            planned += sizes[0] + sizes[1]
        waits = sum(s.waits for s in self._stats)
        if waits != self._waits:
            self._waits, self._quiet = waits, 0
        cold = self._quiet < QUIET_BYTES
        self._quiet += planned
        hints = self._hints
        if not cold or hints is None:
            return
        for _task, _a, _b, ranges in self._queue:
            while ranges:
                fd, start, end = ranges.pop()
                hints.ask(fd, start, end)


def _file_ranges(
    task: Task, heads: dict[int, int] | None = None
) -> tuple[list[int], list[list[int]]]:
    """File bytes each side of *task* reads, and the ``[fd, start, end]`` ranges to ask
    for, merged where contiguous on the same file (the parts of one compressed cluster:
    once).

    Bytes a start-up pull read already (*heads*: fd -> bytes from offset 0) are left
    out of the ranges, not of the sizes: the window bounds what is planned ahead, so
    that the plan stays as far ahead of the workers whatever was pulled."""
    runs: list[tuple[list[int], int]] = []
    last: dict[int, list[int]] = {}
    for part in task.parts:
        for side, seg in ((0, part.a), (1, part.b)):
            where = GuestDisk.file_range(seg)
            if where is None:
                continue
            fd, start, length = where
            run = last.get(fd)
            if run is not None and run[1] <= start <= run[2]:
                run[2] = max(run[2], start + length)
                continue
            run = [fd, start, start + length]
            runs.append((run, side))
            last[fd] = run
    sizes = [0, 0]
    ranges: list[list[int]] = []
    for run, side in runs:
        fd, start, end = run
        sizes[side] += end - start
        start = max(start, heads.get(fd, 0)) if heads else start
        if start < end:
            ranges.append([fd, start, end])
    ranges.reverse()  # popped from the end: asked for in order
    return sizes, ranges


def _granule_flags(diff_words: np.ndarray, start: int, length: int, granularity: int) -> np.ndarray:
    """Granule indices with a difference, from a per-8-byte-word difference mask."""
    if start % granularity == 0 and length % granularity == 0:
        per = granularity // 8
        hit = diff_words.reshape(-1, per).any(axis=1)
        return np.flatnonzero(hit).astype(np.int64) + start // granularity
    pos = np.flatnonzero(diff_words).astype(np.int64)
    return unique_sorted((start + pos * 8) // granularity)


def _granule_flags_bytes(diff: np.ndarray, start: int, granularity: int) -> np.ndarray:
    pos = np.flatnonzero(diff).astype(np.int64)
    return unique_sorted((start + pos) // granularity)


class Comparison:
    """IMAGE and FILE opened for the comparison, so that it can start before it is needed.

    :meth:`start` has the kernel read the first tasks' bytes of both files
    (:class:`ReadAhead`'s window) and returns: the caller does its own work
    -- the check, the plan -- while the storage works.  :meth:`bits` then
    compares, once.  Open it only where the image cannot change any more
    (under the write lock): the plan comes from the metadata read here.
    Use as a context manager; closing it unused wastes nothing but the
    page cache of both heads and the window.
    """

    def __init__(
        self,
        image_path: str | os.PathLike[str],
        reference_path: str | os.PathLike[str],
        *,
        virtual_size: int,
        image_format: str | None = "qcow2",
        reference_format: str | None = None,
    ) -> None:
        self.virtual_size = virtual_size
        self.stats = DiffStats(virtual_size=virtual_size)
        self._closed = False
        self._image = GuestDisk(image_path, fmt=image_format)
        try:
            self._reference = GuestDisk(reference_path, fmt=reference_format)
        except BaseException:
            self._image.close()
            raise
        self.stats.reference_size = self._reference.size
        self._read_ahead = ReadAhead(
            plan(pieces(self._image, self._reference, virtual_size, self.stats)),
            (self._image.stats, self._reference.stats),
            (self._image.fileno(), self._reference.fileno()),
        )
        self._spent = False  # bits() has run (once per comparison)

    def start(self) -> None:
        """Ask for the first read-ahead window of both files now, and return."""
        if not (self._spent or self._closed):
            self._read_ahead.start()

    def bits(
        self, granularity: int, *, progress_factory: object = None
    ) -> tuple[np.ndarray, DiffStats]:
        """See :func:`diff_bits`; once per comparison."""
        if self._spent or self._closed:
            raise RuntimeError("a comparison is made once")
        self._spent = True
        tasks = self._read_ahead
        image, reference, stats = self._image, self._reference, self.stats
        virtual_size = self.virtual_size
        nbits = -(-virtual_size // granularity)
        bits = np.zeros(-(-nbits // 8), dtype=np.uint8)
        if progress_factory is None:
            ctx: object = _NullCtx()
        else:
            factory: Any = progress_factory
            ctx = factory("comparing with the reference", virtual_size)

        def compare(task: Task, scratch: tuple[np.ndarray, np.ndarray]) -> tuple[Task, np.ndarray]:
            return task, _compare_task(image, reference, task, scratch, granularity)

        def buffers() -> tuple[np.ndarray, np.ndarray]:
            return np.empty(BLOCK_BYTES, np.uint8), np.empty(BLOCK_BYTES, np.uint8)

        with ctx as progress:  # type: ignore[attr-defined]
            done = 0
            # Closed on the way out, whatever ends the loop (an error, Ctrl-C): the
            # workers and the read-ahead's thread are stopped and joined before the disks
            # are closed.
            with (
                contextlib.closing(tasks),
                contextlib.closing(ordered_map(compare, tasks, buffers)) as results,
            ):
                for task, found in results:
                    stats.compared_bytes += task.length
                    if len(found):
                        found = found[found < nbits]
                        np.bitwise_or.at(bits, found >> 3, (1 << (found & 7)).astype(np.uint8))
                    progress.advance(task.end - done)
                    done = task.end
            progress.advance(virtual_size - done)
        stats.image_bytes_read = image.stats.bytes_read
        stats.reference_bytes_read = reference.stats.bytes_read
        stats.differing_granules = popcount(bits)
        return bits, stats

    def close(self) -> None:
        """Stop the read-ahead requests and close both files (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._read_ahead.close()
            self._image.close()
        finally:
            self._reference.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def diff_bits(
    image_path: str | os.PathLike[str],
    reference_path: str | os.PathLike[str],
    *,
    virtual_size: int,
    granularity: int,
    image_format: str | None = "qcow2",
    reference_format: str | None = None,
    progress_factory: object = None,
) -> tuple[np.ndarray, DiffStats]:
    """Bits (LSB first, ``ceil(virtual_size / granularity)`` of them) of differing granules.

    Args:
        image_path: the qcow2 image (read through its backing chain).
        reference_path: the reference copy, raw or qcow2 (probed unless
            *reference_format* is given).
        virtual_size: the image's guest size; the bitmap covers exactly this.
        granularity: bytes per bit (a power of two, at least 512).
        progress_factory: ``callable(description, total_bytes)`` returning a
            context manager with ``advance(n)``; None shows nothing.  The
            total is *virtual_size*: progress is how far through the disk
            the comparison is, skipped ranges included.

    Returns:
        ``(bits, stats)``.
    """
    with Comparison(
        image_path,
        reference_path,
        virtual_size=virtual_size,
        image_format=image_format,
        reference_format=reference_format,
    ) as comparison:
        return comparison.bits(granularity, progress_factory=progress_factory)


_NO_GRANULES = np.empty(0, dtype=np.int64)


class _NullCtx:
    def __enter__(self) -> _NoProgress:
        return _NoProgress()

    def __exit__(self, *exc: object) -> None:
        return None


def _compare_task(
    image: GuestDisk,
    reference: GuestDisk,
    task: Task,
    scratch: tuple[np.ndarray, np.ndarray],
    granularity: int,
) -> np.ndarray:
    """The differing granules of one task (sorted within each block, maybe repeated)."""
    buf_a, buf_b = scratch
    found: list[np.ndarray] = []
    for part in task.parts:
        a, b = part.a, part.b
        pos = part.start
        while pos < part.end:
            end = min(part.end, (pos // BLOCK_BYTES + 1) * BLOCK_BYTES)
            hit = _compare_block(
                _side(image, a, pos, end, buf_a),
                _side(reference, b, pos, end, buf_b),
                pos,
                end - pos,
                granularity,
            )
            if hit is not None:
                found.append(hit)
            pos = end
    if not found:
        return _NO_GRANULES
    return found[0] if len(found) == 1 else np.concatenate(found)


def _side(
    disk: GuestDisk, seg: Segment, start: int, end: int, buf: np.ndarray
) -> np.ndarray | None:
    """Guest bytes ``[start, end)`` of *seg*: None for zeros, else a view (of *buf* or of a
    decompressed cluster)."""
    if seg.kind == ZERO:
        return None
    delta = start - seg.start
    if seg.kind == COMPRESSED:
        return disk.view_segment(seg, delta, end - start)
    out = buf[: end - start]
    disk.read_segment(seg, out.data, delta)
    return out


def _compare_block(
    a: np.ndarray | None, b: np.ndarray | None, start: int, n: int, granularity: int
) -> np.ndarray | None:
    """Granules of ``[start, start + n)`` where *a* and *b* (None: zeros) differ; None if none."""
    if a is None or b is None:
        data = b if a is None else a
        if data is None:
            return None
        if _equal(data, _ZEROS[:n]) if n <= len(_ZEROS) else not data.any():
            return None
        if start % 8 == 0 and n % 8 == 0:
            return _granule_flags(data.view(np.uint64) != 0, start, n, granularity)
        return _granule_flags_bytes(data != 0, start, granularity)
    if _equal(a, b):
        return None
    if start % 8 == 0 and n % 8 == 0:
        return _granule_flags(a.view(np.uint64) != b.view(np.uint64), start, n, granularity)
    return _granule_flags_bytes(a != b, start, granularity)


def validate_reference(
    image_path: str | os.PathLike[str],
    reference_path: str | os.PathLike[str],
    *,
    reference_format: str | None = None,
) -> None:
    """Refuse a reference that cannot tell what changed in the image.

    Raises UsageError (exit 64) when the reference is the image itself -- the
    same file under any name, or a qcow2 whose backing chain contains it:
    every granule would compare equal and the writes since the last backup
    would never be marked.  Raises UnsupportedImageError when either side's
    guest data cannot be read (an external data file, encryption), naming
    ``--mode full`` as what works instead.
    """
    try:
        with GuestDisk(image_path, fmt="qcow2"):
            pass
        try:
            with GuestDisk(reference_path, fmt=reference_format) as reference:
                theirs = reference.sources()
        except ImageFormatError as exc:
            raise ImageFormatError(
                f"the reference {reference_path}: {exc.reason}", offset=exc.offset, field=exc.field
            ) from exc
    except UnsupportedImageError as exc:
        raise UnsupportedImageError(
            f"{exc}; --reference compares guest data, which qbitmap cannot read here: "
            "use --mode full instead"
        ) from exc
    image = _identity(image_path)
    if image in theirs:
        which = (
            "is the image itself"
            if _identity(reference_path) == image
            else "has the image in its backing chain"
        )
        raise UsageError(
            f"--reference {reference_path} {which}: every granule would compare equal and "
            "the writes since the last backup would never be marked"
        )


def _identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    st = os.stat(Path(path))
    return st.st_dev, st.st_ino


def reduce_bits(bits: np.ndarray, nbits_fine: int, factor: int, nbits_coarse: int) -> np.ndarray:
    """OR groups of *factor* fine bits into one coarse bit (granularity * factor), packed."""
    if factor == 1:
        return bits.copy()
    coarse = np.zeros(nbits_coarse, dtype=bool)
    hit = group_any(bits, nbits_fine, factor)
    coarse[: min(len(hit), nbits_coarse)] = hit[:nbits_coarse]
    return np.packbits(coarse, bitorder="little")
