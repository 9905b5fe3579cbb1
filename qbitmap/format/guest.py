"""Guest data of a disk image: an allocation map first, bytes only on request.

A :class:`GuestDisk` is a raw file or a qcow2 image with its backing chain.
:meth:`GuestDisk.segments` describes a guest byte range as runs of

* ``zero``: reads as zeros (qcow2 zero clusters/subclusters, holes of a raw
  file, anything past the end of the chain's last layer);
* ``data``: plain bytes at ``host`` in the file identified by ``source``;
* ``compressed``: one compressed qcow2 cluster (deflate or zstd);

already resolved through the backing chain, so that two disks sharing a
backing file produce the *same* ``(source, host)`` for the shared ranges and
a comparison can skip them without reading.  :meth:`GuestDisk.read_segment`
reads (part of) one segment; :meth:`GuestDisk.file_range` names the file
bytes that reading a segment takes, without reading them.  Reads may come
from several threads at once.

L2 entries are decoded by :mod:`qbitmap.format.entries` (QEMU's cluster types
and compressed descriptors); here:

* an UNALLOCATED cluster reads from the backing file;
* extended L2 (incompatible bit 4): 32 subclusters per cluster, second word
  bit x "allocated", bit 32+x "reads as zeros", neither = backing;
* compressed: raw deflate (``zlib`` with wbits -15), or zstd
  (compression_type 1) through the optional ``zstandard`` package; one
  segment per compressed cluster (its subclusters, with extended L2, are
  one run), and the last cluster each thread decompressed is kept, so
  consecutive reads of one cluster read its bytes once;
* the backing file name is relative to the image's directory; its format
  comes from the backing-format extension or, without one, from the magic.

Refused (UnsupportedImageError): encryption, external data files, backing
names that are not plain file names (``json:``, protocol URLs), chains
deeper than 64.
"""

from __future__ import annotations

import os
import stat
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol, Self

import numpy as np

from qbitmap.errors import ImageFormatError, ImageIOError, QbitmapError, UnsupportedImageError
from qbitmap.format import entries as ent
from qbitmap.format import layout
from qbitmap.format.entries import ClusterType
from qbitmap.format.image import Image, open_image_file
from qbitmap.format.layout import QCOW_MAX_L1_SIZE
from qbitmap.format.model import IncompatibleFeature

MAX_CHAIN_DEPTH = 64

# What a guest range holds once resolved through the chain: QEMU's cluster types
# (entries.ClusterType), of which a Segment uses three.
ZERO, DATA, COMPRESSED = ClusterType.ZERO_PLAIN, ClusterType.NORMAL, ClusterType.COMPRESSED
_CLUSTER_TYPES = {int(kind): kind for kind in ClusterType}  # faster than ClusterType(n)


class Segment(NamedTuple):
    """Guest bytes ``[start, start + length)`` of one kind.

    ``source`` identifies the file the bytes live in (``(st_dev, st_ino)``);
    for ``data`` the bytes are at ``host .. host + length`` of that file; for
    ``compressed`` ``host`` is the L2 entry and ``skip`` the offset inside
    the decompressed cluster.  ``layer`` is the object that can read them.
    A named tuple: immutable, and made by the thousand while a comparison
    plans (a frozen dataclass takes four times as long to make).
    """

    start: int
    length: int
    kind: ClusterType  # ZERO (reads as zeros), DATA or COMPRESSED
    source: tuple[int, int] | None = None
    host: int = 0
    skip: int = 0
    layer: _Layer | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def same_bytes_as(self, other: Segment) -> bool:
        """True if both segments are known to hold identical bytes without reading."""
        if self.kind == ZERO and other.kind == ZERO:
            return True
        if self.kind != other.kind or self.source is None or self.source != other.source:
            return False
        return self.host == other.host and self.skip == other.skip

    def cut(self, start: int, end: int) -> Segment:
        """The part of this segment inside ``[start, end)``."""
        delta = start - self.start
        if self.kind == DATA:
            return Segment(start, end - start, DATA, self.source, self.host + delta, 0, self.layer)
        if self.kind == COMPRESSED:
            return Segment(
                start,
                end - start,
                COMPRESSED,
                self.source,
                self.host,
                self.skip + delta,
                self.layer,
            )
        return Segment(start, end - start, self.kind, self.source, self.host, self.skip, self.layer)


class _Layer(Protocol):
    size: int
    source: tuple[int, int]

    def segments(self, start: int, end: int) -> Iterator[Segment]: ...

    def read_segment(self, seg: Segment, out: memoryview, delta: int = 0) -> None: ...

    def file_range(self, seg: Segment) -> tuple[int, int, int] | None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class ReadStats:
    """Bytes actually read from files (tests and the benchmark check it); counted under a
    lock, since several threads read at once."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.decompressed_clusters = 0
        self.waits = 0  # reads that found bytes missing from the page cache
        self._lock = threading.Lock()

    def add(self, nbytes: int, *, clusters: int = 0, waited: bool = False) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.decompressed_clusters += clusters
            self.waits += waited


# A read that takes only what the page cache holds (Linux 4.14+), so that a
# read that has to wait for the storage can be told from one that does not.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _pread_into(fd: int, out: memoryview, offset: int, stats: ReadStats, path: Path) -> int:
    """Fill *out* from file *offset*; past the end of the file it reads as zeros.

    Returns the bytes read from the file.  Counts them, and counts in
    ``stats.waits`` a read that had to wait for the storage: the page cache
    is asked first (``RWF_NOWAIT``), the rest is read as usual.
    """
    done = 0
    total = len(out)
    if _NOWAIT and total:
        try:
            done = os.preadv(fd, [out], offset, _NOWAIT)
        except OSError:  # EAGAIN: nothing cached; EOPNOTSUPP: the file cannot tell
            done = 0
    first = done
    while done < total:
        try:
            n = os.preadv(fd, [out[done:]], offset + done)
        except OSError as exc:
            raise ImageIOError(
                f"{path}: read at {offset + done:#x} failed: {exc.strerror}"
            ) from exc
        if n == 0:
            out[done:] = bytes(total - done)  # past EOF reads as zeros
            break
        done += n
    stats.add(done, waited=done > first)
    return done


class RawLayer:
    """A raw file: data where the file has data, zeros in holes and past EOF."""

    def __init__(self, path: Path, stats: ReadStats) -> None:
        self.path = path
        self.stats = stats
        self.fd = open_image_file(path)
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            self.size = st.st_size
        self.source = (st.st_dev, st.st_ino)

    def _extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                yield pos, end, False  # ENXIO: only a hole from here
                return
            if data > pos:
                yield pos, min(data, end), False
                pos = data
                if pos >= end:
                    return
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            yield pos, hole, True
            pos = hole

    def segments(self, start: int, end: int) -> Iterator[Segment]:
        stop = min(end, self.size)
        if start < stop:
            for a, b, is_data in self._extents(start, stop):
                if is_data:
                    yield Segment(a, b - a, DATA, self.source, a, 0, self)
                else:
                    yield Segment(a, b - a, ZERO)
        if end > max(start, stop):
            lo = max(start, stop)
            yield Segment(lo, end - lo, ZERO)

    def read_segment(self, seg: Segment, out: memoryview, delta: int = 0) -> None:
        _pread_into(self.fd, out, seg.host + delta, self.stats, self.path)

    def file_range(self, seg: Segment) -> tuple[int, int, int] | None:
        return (self.fd, seg.host, seg.length) if seg.kind == DATA else None

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Qcow2Layer:
    """One qcow2 image; unallocated ranges are delegated to its backing layer."""

    def __init__(self, path: Path, stats: ReadStats, depth: int = 0) -> None:
        self.path = path
        self.stats = stats
        self.image = Image.open(path)
        self.backing: _Layer | None = None
        try:
            self._setup(depth)
        except BaseException:
            self.close()
            raise

    def _setup(self, depth: int) -> None:
        image = self.image
        header = image.header
        if header.crypt_method:
            raise UnsupportedImageError(
                f"{self.path}: encrypted images are not supported for guest reads"
            )
        incompatible = header.incompatible
        if incompatible & IncompatibleFeature.EXTERNAL_DATA_FILE:
            raise UnsupportedImageError(
                f"{self.path}: images with an external data file are not supported"
            )
        st = os.fstat(image.fd)
        self.source = (st.st_dev, st.st_ino)
        self.size = image.virtual_size
        self.cluster_size = image.cluster_size
        self.cluster_bits = image.cluster_bits
        self.extended = bool(incompatible & IncompatibleFeature.EXTENDED_L2)
        self.entry_words = 2 if self.extended else 1
        self.l2_entries = self.cluster_size // (8 * self.entry_words)
        self.compression_type = header.compression_type or 0
        if header.l1_size * 8 > QCOW_MAX_L1_SIZE:
            raise ImageFormatError(
                f"l1_size {header.l1_size} is too large",
                offset=layout.HEADER_FIELD.l1_size,
                field="l1_size",
            )
        raw = image.read(
            header.l1_table_offset, header.l1_size * 8, what="L1 table", field="l1_table_offset"
        )
        self.l1 = ent.be64(raw)
        self._l2_cache: dict[int, np.ndarray] = {}
        # The last cluster each thread decompressed: (L2 entry, bytes).
        self._decompressed = threading.local()
        if header.backing_file_offset:
            if depth >= MAX_CHAIN_DEPTH:
                raise UnsupportedImageError(
                    f"{self.path}: backing chain deeper than {MAX_CHAIN_DEPTH}"
                )
            raw_name = image.read(
                header.backing_file_offset,
                header.backing_file_size,
                what="backing file name",
                field="backing_file_offset",
            )
            name = raw_name.decode("utf-8", "surrogateescape")
            if ":" in name.split("/", 1)[0] and not Path(name).exists():
                raise UnsupportedImageError(
                    f"{self.path}: backing file {name!r} is not a plain file name"
                )
            backing_path = Path(name) if os.path.isabs(name) else self.path.parent / name
            fmt_ext = image.extension(layout.EXT_BACKING_FORMAT)
            fmt = fmt_ext.data.decode("ascii", "replace") if fmt_ext is not None else None
            try:
                self.backing = open_layer(backing_path, self.stats, fmt=fmt, depth=depth + 1)
            except ImageFormatError as exc:
                raise ImageFormatError(
                    f"{backing_path}, the backing file of {self.path}: {exc.reason}",
                    offset=exc.offset,
                    field=exc.field,
                ) from exc
            except QbitmapError as exc:
                raise type(exc)(f"{exc} (the backing file of {self.path})") from exc

    # -- mapping ------------------------------------------------------------------

    def _l2(self, l1_index: int) -> np.ndarray | None:
        if l1_index in self._l2_cache:
            return self._l2_cache[l1_index]
        if l1_index >= len(self.l1):
            return None
        offset = int(self.l1[l1_index] & ent.L1E_OFFSET)
        if offset == 0:
            return None
        try:
            raw = self.image.read(
                offset, self.cluster_size, what=f"L2 table {l1_index}", field="L1 entry"
            )
        except ImageFormatError as exc:
            raise ImageFormatError(
                f"{self.path}: {exc.reason}", offset=exc.offset, field=exc.field
            ) from exc
        except ImageIOError as exc:
            raise ImageIOError(f"{self.path}: {exc}") from exc
        table = ent.be64(raw)
        if len(self._l2_cache) > 4096:
            self._l2_cache.clear()
        self._l2_cache[l1_index] = table
        return table

    def _units(self, l2: np.ndarray, first: int, count: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(unit size, ClusterType per unit, host per unit) for L2 entries [first, first+count).

        Units are clusters, or subclusters with extended L2 entries.  UNALLOCATED
        units read from the backing file.  A compressed unit's host is its L2 entry.
        """
        cs = self.cluster_size
        if not self.extended:
            words = l2[first : first + count]
            kind = ent.cluster_types(words, extended=False, external_data=False)
            kind[kind == ClusterType.ZERO_ALLOC] = ClusterType.ZERO_PLAIN
            compressed = kind == ClusterType.COMPRESSED
            host = np.where(compressed, words & ~ent.COPIED, words & ent.L2E_OFFSET)
            return cs, kind, host
        pairs = l2.reshape(-1, 2)[first : first + count]
        words, bitmap = pairs[:, 0], pairs[:, 1]
        sub = cs // 32
        shifts = np.arange(32, dtype=np.uint64)
        alloc = ((bitmap[:, None] >> shifts[None, :]) & np.uint64(1)).astype(bool)
        zero = ((bitmap[:, None] >> (shifts[None, :] + np.uint64(32))) & np.uint64(1)).astype(bool)
        compressed = ent.cluster_types(words, extended=True, external_data=False) == COMPRESSED
        kind = np.full((count, 32), ClusterType.UNALLOCATED, dtype=np.int8)
        kind[alloc] = ClusterType.NORMAL
        kind[zero] = ClusterType.ZERO_PLAIN
        kind[compressed, :] = ClusterType.COMPRESSED
        base = words & ent.L2E_OFFSET
        host = base[:, None] + shifts[None, :] * np.uint64(sub)
        comp_host = np.repeat((words & ~ent.COPIED)[:, None], 32, axis=1)
        host = np.where(compressed[:, None], comp_host, host)
        return sub, kind.reshape(-1), host.reshape(-1)

    def _own_runs(self, start: int, end: int) -> Iterator[tuple[int, int, ClusterType, int, int]]:
        """(start, end, kind, host, skip) runs of this layer alone (before backing)."""
        cs = self.cluster_size
        span = cs * self.l2_entries
        pos = start
        while pos < end:
            l1_index = pos // span
            table_end = min(end, (l1_index + 1) * span)
            l2 = self._l2(l1_index)
            if l2 is None:
                yield pos, table_end, ClusterType.UNALLOCATED, 0, 0
                pos = table_end
                continue
            first = (pos % span) // cs
            last = (table_end - 1) % span // cs
            count = last - first + 1
            unit, kind, host = self._units(l2, first, count)
            base = l1_index * span + first * cs
            n = len(kind)
            if n == 0:
                pos = table_end
                continue
            # Run boundaries: kind changes, data not contiguous, every compressed
            # cluster (the subclusters of one are one run).
            brk = np.ones(n, dtype=bool)
            if n > 1:
                same_kind = kind[1:] == kind[:-1]
                contiguous = host[1:] == host[:-1] + np.uint64(unit)
                same_cluster = (np.arange(1, n) % (cs // unit)) != 0
                cont = same_kind & (
                    (kind[1:] == ZERO)
                    | (kind[1:] == ClusterType.UNALLOCATED)
                    | ((kind[1:] == DATA) & contiguous)
                    | ((kind[1:] == COMPRESSED) & same_cluster)
                )
                brk[1:] = ~cont
            starts = np.flatnonzero(brk)
            ends = np.append(starts[1:], n)
            runs = zip(
                starts.tolist(),
                ends.tolist(),
                kind[starts].tolist(),
                host[starts].tolist(),
                strict=True,
            )
            for s_i, e_i, k_i, h in runs:
                a = max(pos, base + s_i * unit)
                b = min(table_end, base + e_i * unit)
                if a >= b:
                    continue
                k = _CLUSTER_TYPES[k_i]
                skip = 0
                if k == DATA:
                    h += a - (base + s_i * unit)
                elif k == COMPRESSED:
                    # unit may be a subcluster: offset inside the decompressed cluster
                    cluster_start = (base + s_i * unit) // cs * cs
                    skip = a - cluster_start
                yield a, b, k, h, skip
            pos = table_end

    def segments(self, start: int, end: int) -> Iterator[Segment]:
        stop = min(end, self.size)
        if start < stop:
            for a, b, kind, host, skip in self._own_runs(start, stop):
                if kind == ZERO:
                    yield Segment(a, b - a, ZERO)
                elif kind == DATA:
                    yield Segment(a, b - a, DATA, self.source, host, 0, self)
                elif kind == COMPRESSED:
                    yield Segment(a, b - a, COMPRESSED, self.source, host, skip, self)
                elif self.backing is None:
                    yield Segment(a, b - a, ZERO)
                else:
                    yield from self.backing.segments(a, b)
        if end > max(start, stop):
            lo = max(start, stop)
            yield Segment(lo, end - lo, ZERO)

    # -- reading -------------------------------------------------------------------

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """``(offset, length)`` of the file bytes of a compressed cluster's L2 entry."""
        coffset, csize = ent.compressed_ranges(
            np.array([entry], dtype=np.uint64), self.cluster_bits
        )
        return int(coffset[0]), int(csize[0])

    def _decompress(self, entry: int) -> bytes:
        cached = getattr(self._decompressed, "cluster", None)
        if cached is not None and cached[0] == entry:
            return cached[1]
        cs = self.cluster_size
        offset, size = self._compressed_range(entry)
        buf = bytearray(size)
        data = buf[: _pread_into(self.image.fd, memoryview(buf), offset, self.stats, self.path)]
        try:
            if self.compression_type == 0:
                out = zlib.decompressobj(-15).decompress(data, cs)
            elif self.compression_type == 1:
                out = _zstd_decompress(data, cs, self.path, offset)
            else:
                raise UnsupportedImageError(
                    f"{self.path}: unknown compression type {self.compression_type}"
                )
        except zlib.error as exc:
            raise ImageFormatError(
                f"{self.path}: compressed cluster does not decompress: {exc}",
                offset=offset,
                field="compressed cluster",
            ) from exc
        if len(out) < cs:
            raise ImageFormatError(
                f"{self.path}: compressed cluster decompresses to {len(out)} bytes, not {cs}",
                offset=offset,
                field="compressed cluster",
            )
        out = out[:cs]
        self.stats.add(0, clusters=1)
        self._decompressed.cluster = (entry, out)
        return out

    def view_segment(
        self, seg: Segment, delta: int = 0, length: int | None = None
    ) -> np.ndarray | None:
        """A compressed segment's bytes (*length* of them from *delta* on, all by default)
        as a view of its decompressed cluster; None for other segments."""
        if seg.kind != COMPRESSED:
            return None
        cluster = self._decompress(seg.host)
        first = seg.skip + delta
        n = seg.length - delta if length is None else length
        return np.frombuffer(cluster, dtype=np.uint8)[first : first + n]

    def read_segment(self, seg: Segment, out: memoryview, delta: int = 0) -> None:
        if seg.kind == DATA:
            _pread_into(self.image.fd, out, seg.host + delta, self.stats, self.path)
        elif seg.kind == COMPRESSED:
            cluster = self._decompress(seg.host)
            first = seg.skip + delta
            out[:] = cluster[first : first + len(out)]
        else:
            out[:] = bytes(len(out))

    def fileno(self) -> int:
        return self.image.fd

    def file_range(self, seg: Segment) -> tuple[int, int, int] | None:
        if seg.kind == DATA:
            return self.image.fd, seg.host, seg.length
        if seg.kind == COMPRESSED:
            return (self.image.fd, *self._compressed_range(seg.host))
        return None

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        self.image.close()


def _zstd_decompress(data: bytes, size: int, path: Path, offset: int) -> bytes:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - zstandard is a dependency
        raise UnsupportedImageError(
            f"{path}: zstd-compressed clusters need the 'zstandard' package"
        ) from exc
    try:
        obj = zstandard.ZstdDecompressor().decompressobj()
        return obj.decompress(data)[:size]
    except zstandard.ZstdError as exc:
        raise ImageFormatError(
            f"{path}: compressed cluster does not decompress: {exc}",
            offset=offset,
            field="compressed cluster",
        ) from exc


def open_layer(path: Path, stats: ReadStats, *, fmt: str | None = None, depth: int = 0) -> _Layer:
    """Open *path* as a qcow2 or raw layer (*fmt*, or probed from the magic)."""
    if fmt is None:
        fd = open_image_file(path)
        try:
            magic = os.pread(fd, len(layout.MAGIC), 0)
        except OSError as exc:
            raise ImageIOError(f"{path}: cannot read: {exc.strerror}") from exc
        finally:
            os.close(fd)
        fmt = "qcow2" if magic == layout.MAGIC else "raw"
    if fmt == "qcow2":
        return Qcow2Layer(path, stats, depth)
    if fmt in ("raw", "file", "host_device"):
        return RawLayer(path, stats)
    raise UnsupportedImageError(f"{path}: image format {fmt!r} is not supported (qcow2 or raw)")


class GuestDisk:
    """The guest view of a raw file or a qcow2 image with its backing chain.

    Use as a context manager.  ``size`` is the guest size (the top layer's).
    """

    def __init__(self, path: str | os.PathLike[str], *, fmt: str | None = None) -> None:
        self.path = Path(path)
        self.stats = ReadStats()
        self.top = open_layer(self.path, self.stats, fmt=fmt)
        self.size = self.top.size

    def segments(self, start: int = 0, end: int | None = None) -> Iterator[Segment]:
        """Runs covering ``[start, end)`` exactly; past ``size`` everything is zero."""
        end = self.size if end is None else end
        pending: Segment | None = None
        for seg in self.top.segments(start, end):
            if seg.length <= 0:
                continue
            if pending is not None and _mergeable(pending, seg):
                pending = Segment(
                    pending.start,
                    pending.length + seg.length,
                    pending.kind,
                    pending.source,
                    pending.host,
                    pending.skip,
                    pending.layer,
                )
                continue
            if pending is not None:
                yield pending
            pending = seg
        if pending is not None:
            yield pending

    def read_segment(self, seg: Segment, out: memoryview, delta: int = 0) -> None:
        """Fill *out* with the guest bytes of *seg* from *delta* bytes into it on."""
        if seg.kind == ZERO or seg.layer is None:
            out[:] = bytes(len(out))
        else:
            seg.layer.read_segment(seg, out, delta)

    def view_segment(
        self, seg: Segment, delta: int = 0, length: int | None = None
    ) -> np.ndarray | None:
        """*length* bytes of a segment from *delta* on (all by default) without reading
        into a buffer (decompressed data); or None."""
        if seg.kind == ZERO or seg.layer is None:
            return None
        view = getattr(seg.layer, "view_segment", None)
        return None if view is None else view(seg, delta, length)

    @staticmethod
    def file_range(seg: Segment) -> tuple[int, int, int] | None:
        """``(fd, offset, length)``: the file bytes reading all of *seg* takes (a data run,
        or a whole compressed cluster); None when it reads no file."""
        if seg.kind == ZERO or seg.layer is None:
            return None
        return seg.layer.file_range(seg)

    def fileno(self) -> int:
        """The file descriptor of the top file, the one *path* names."""
        return self.top.fileno()

    def sources(self) -> set[tuple[int, int]]:
        """``(st_dev, st_ino)`` of every file of the chain, top to bottom."""
        found: set[tuple[int, int]] = set()
        layer: object | None = self.top
        while layer is not None:
            found.add(layer.source)  # type: ignore[attr-defined]
            layer = getattr(layer, "backing", None)
        return found

    def read(self, start: int, length: int) -> bytes:
        """Guest bytes ``[start, start + length)`` (for tests and small reads)."""
        buf = bytearray(length)
        view = memoryview(buf)
        for seg in self.segments(start, start + length):
            self.read_segment(seg, view[seg.start - start : seg.end - start])
        return bytes(buf)

    def close(self) -> None:
        self.top.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mergeable(a: Segment, b: Segment) -> bool:
    if a.end != b.start or a.kind != b.kind:
        return False
    if a.kind == ZERO:
        return True
    if a.kind == DATA:
        return a.source == b.source and a.layer is b.layer and a.host + a.length == b.host
    return False
