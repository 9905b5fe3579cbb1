"""Which granules differ between the image's guest data and a reference copy.

The reference is the guest data as of the bitmap's last clear point (the
last backup).  Every granule whose bytes differ between IMAGE and FILE
changed since then, so OR-ing those granules into the on-disk bitmap gives
an exact recovery.

Allocation maps are compared first (:class:`qbitmap.format.guest.GuestDisk`
resolves both backing chains): ranges that are zero on both sides, or that
both sides take from the same bytes of the same file (a shared backing
file), are never read.  Only the rest is read, in chunks of up to
:data:`CHUNK_BYTES`, into two reused buffers and compared with numpy.
Bytes past the end of the shorter disk compare as zeros.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qbitmap.errors import ImageFormatError, UnsupportedImageError, UsageError
from qbitmap.format.bitmap import group_any, unique_sorted
from qbitmap.format.guest import ZERO, GuestDisk, Segment
from qbitmap.parallel import ordered_map

CHUNK_BYTES = 4 << 20


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
_ZEROS = np.zeros(CHUNK_BYTES, dtype=np.uint8)


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


@dataclass(frozen=True, slots=True)
class Piece:
    """A guest range where one segment of each side must be compared."""

    start: int
    end: int
    a: Segment
    b: Segment


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
            context manager with ``advance(n)``; None shows nothing.

    Returns:
        ``(bits, stats)``.
    """
    nbits = -(-virtual_size // granularity)
    bits = np.zeros(-(-nbits // 8), dtype=np.uint8)
    stats = DiffStats(virtual_size=virtual_size)
    with (
        GuestDisk(image_path, fmt=image_format) as image,
        GuestDisk(reference_path, fmt=reference_format) as reference,
    ):
        stats.reference_size = reference.size
        work = list(pieces(image, reference, virtual_size, stats))
        total = sum(p.end - p.start for p in work)
        if progress_factory is None:
            ctx: object = _NullCtx()
        else:
            ctx = progress_factory("comparing with the reference", total)  # type: ignore[operator]
        tasks: list[tuple[Piece, int, int]] = []
        for piece in work:
            pos = piece.start
            while pos < piece.end:
                # Chunks end on granule boundaries where possible.
                end = min(piece.end, pos + CHUNK_BYTES)
                if end < piece.end and end % granularity:
                    aligned = end - end % granularity
                    if aligned > pos:
                        end = aligned
                tasks.append((piece, pos, end))
                pos = end
        with ctx as progress:  # type: ignore[attr-defined]
            found = _run_tasks(image, reference, tasks, granularity, progress)
        stats.compared_bytes = sum(end - pos for _p, pos, end in tasks)
        stats.image_bytes_read = image.stats.bytes_read
        stats.reference_bytes_read = reference.stats.bytes_read
    if found:
        idx = unique_sorted(np.concatenate(found))
        idx = idx[idx < nbits]
        stats.differing_granules = len(idx)
        np.bitwise_or.at(bits, idx >> 3, (1 << (idx & 7)).astype(np.uint8))
    return bits, stats


def _run_tasks(
    image: GuestDisk,
    reference: GuestDisk,
    tasks: list[tuple[Piece, int, int]],
    granularity: int,
    progress: Progress,
) -> list[np.ndarray]:
    """Compare every task's range; the differing granules of each, in task order.

    On :func:`qbitmap.parallel.ordered_map`'s workers: reads, page-cache
    copies and memcmp release the GIL.  Each worker keeps its own two
    buffers; progress is advanced under a lock.
    """
    lock = threading.Lock()

    def compare(i: int, bufs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        piece, pos, end = tasks[i]
        n = end - pos
        found = _compare(image, reference, piece, pos, end, bufs[0][:n], bufs[1][:n], granularity)
        with lock:
            progress.advance(n)
        return found

    def buffers() -> tuple[np.ndarray, np.ndarray]:
        return np.empty(CHUNK_BYTES, np.uint8), np.empty(CHUNK_BYTES, np.uint8)

    return list(ordered_map(compare, len(tasks), buffers))


_NO_GRANULES = np.empty(0, dtype=np.int64)


class _NullCtx:
    def __enter__(self) -> _NoProgress:
        return _NoProgress()

    def __exit__(self, *exc: object) -> None:
        return None


def _compare(
    image: GuestDisk,
    reference: GuestDisk,
    piece: Piece,
    start: int,
    end: int,
    buf_a: np.ndarray,
    buf_b: np.ndarray,
    granularity: int,
) -> np.ndarray:
    n = end - start
    a = piece.a.cut(start, end)
    b = piece.b.cut(start, end)
    a_zero = a.kind == ZERO
    b_zero = b.kind == ZERO
    if not a_zero:
        view = image.view_segment(a)
        if view is None:
            image.read_segment(a, buf_a.data)
        else:
            buf_a = view
    if not b_zero:
        view = reference.view_segment(b)
        if view is None:
            reference.read_segment(b, buf_b.data)
        else:
            buf_b = view
    words = start % 8 == 0 and n % 8 == 0
    if a_zero or b_zero:
        data = buf_b if a_zero else buf_a
        if _equal(data, _ZEROS[:n]):
            return np.empty(0, dtype=np.int64)
        if words:
            w = data.view(np.uint64)
            if not w.any():
                return np.empty(0, dtype=np.int64)
            return _granule_flags(w != 0, start, n, granularity)
        return _granule_flags_bytes(data != 0, start, granularity)
    if _equal(buf_a, buf_b):
        return np.empty(0, dtype=np.int64)
    if words:
        wa = buf_a.view(np.uint64)
        wb = buf_b.view(np.uint64)
        neq = wa != wb
        if not neq.any():
            return np.empty(0, dtype=np.int64)
        return _granule_flags(neq, start, n, granularity)
    return _granule_flags_bytes(buf_a != buf_b, start, granularity)


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
