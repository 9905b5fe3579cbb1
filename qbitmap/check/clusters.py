"""Who references which cluster, and what the refcounts say about bitmap clusters.

:func:`reference_map` walks every structure that owns clusters -- the header
cluster, the refcount table and blocks, the active L1 and its L2 tables and
guest data (compressed data counted on every host cluster it touches), the
snapshot table and each snapshot's L1/L2/data, the LUKS header, and, when QEMU
would load them, the bitmap directory, tables and data -- the way QEMU's
``calculate_refcounts`` does (qcow2-digest 4.7, 5.1-5.5, 5.9).  References are
kept as numpy arrays; overlaps and reference counts come from sorting and
``searchsorted``, never from a Python loop over clusters.

Every read is bounded by the file: tables must lie inside it, each L2 table is
read once however many L1 entries point at it, and the L1 tables of snapshots
together may not claim more bytes than the file holds.

``qbitmap recover`` uses :meth:`ReferenceMap.exclusive_clusters` to learn which
clusters only a given bitmap owns.
"""

from __future__ import annotations

import enum
import itertools
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from qbitmap.check.context import Context
from qbitmap.check.findings import Finding
from qbitmap.format import BitmapEntry, Image, IncompatibleFeature, layout, unique_sorted
from qbitmap.format.image import QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE
from qbitmap.format.refcount import decode_refcount_block

QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
# Contiguous metadata clusters (L2 tables, refcount blocks) are read together, this much at a time.
READ_BATCH = 16 << 20
# L2 tables are scanned a window of this many contiguous bytes at a time, by SCAN_WORKERS
# threads (the development and benchmark machines have two cores): 8 MiB windows keep the
# peak RSS where one thread with 16 MiB windows had it, at nearly the speed of 16 MiB ones.
SCAN_WINDOW = 8 << 20
SCAN_WORKERS = min(2, os.cpu_count() or 1)
PARALLEL_SCAN_BYTES = 8 << 20  # less than this is scanned by the calling thread alone
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux; elsewhere pages fault in as read


class Kind(enum.IntEnum):
    """What a reference is."""

    HEADER = 0
    L1 = 1
    L2 = 2
    DATA = 3
    COMPRESSED = 4
    REFCOUNT_TABLE = 5
    REFCOUNT_BLOCK = 6
    SNAPSHOT_TABLE = 7
    SNAPSHOT_L1 = 8
    CRYPTO_HEADER = 9
    BITMAP_DIRECTORY = 10
    BITMAP_TABLE = 11
    BITMAP_DATA = 12

    @property
    def phrase(self) -> str:
        return _PHRASES[self]


_PHRASES = {
    Kind.HEADER: "the image header",
    Kind.L1: "the active L1 table",
    Kind.L2: "an L2 table",
    Kind.DATA: "guest data",
    Kind.COMPRESSED: "compressed guest data",
    Kind.REFCOUNT_TABLE: "the refcount table",
    Kind.REFCOUNT_BLOCK: "a refcount block",
    Kind.SNAPSHOT_TABLE: "the snapshot table",
    Kind.SNAPSHOT_L1: "a snapshot's L1 table",
    Kind.CRYPTO_HEADER: "the encryption header",
    Kind.BITMAP_DIRECTORY: "the bitmap directory",
    Kind.BITMAP_TABLE: "a bitmap table",
    Kind.BITMAP_DATA: "bitmap data",
}

_EMPTY_I64 = np.zeros(0, dtype=np.int64)


@dataclass
class _Refs:
    """Accumulates (cluster, kind, weight) triples in chunks."""

    clusters: list[np.ndarray] = field(default_factory=list)
    kinds: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)

    def add(self, clusters: np.ndarray, kind: Kind, weights: np.ndarray | int = 1) -> None:
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(clusters):
            return
        self.clusters.append(clusters)
        self.kinds.append(np.full(len(clusters), int(kind), dtype=np.uint8))
        if isinstance(weights, int):
            self.weights.append(np.full(len(clusters), weights, dtype=np.int64))
        else:
            self.weights.append(np.asarray(weights, dtype=np.int64))

    def add_range(self, offset: int, length: int, kind: Kind, cluster_bits: int) -> None:
        if length <= 0:
            return
        first = offset >> cluster_bits
        last = (offset + length - 1) >> cluster_bits
        self.add(np.arange(first, last + 1, dtype=np.int64), kind)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.clusters:
            return _EMPTY_I64, np.zeros(0, np.uint8), _EMPTY_I64
        return (
            np.concatenate(self.clusters),
            np.concatenate(self.kinds),
            np.concatenate(self.weights),
        )


@dataclass(frozen=True, slots=True)
class BitmapRef:
    """One reference from a bitmap structure to a cluster."""

    cluster: int
    kind: Kind  # BITMAP_DIRECTORY, BITMAP_TABLE or BITMAP_DATA
    bitmap: int  # directory index; -1 for the directory
    source: int  # file offset of the field holding the reference


@dataclass
class ReferenceMap:
    """Every reference to every cluster of an image.

    Non-bitmap references are ``clusters``/``kinds``/``weights`` (a weight is
    how many times the reference counts, e.g. an L2 table shared by the
    active L1 and two snapshots has weight 3).  Bitmap references are kept
    one per reference with the bitmap's directory index and the file offset
    of the field that points at the cluster.
    """

    cluster_size: int
    cluster_bits: int
    file_clusters: int  # clusters that start inside the file
    clusters: np.ndarray  # int64, sorted
    kinds: np.ndarray  # uint8 Kind
    weights: np.ndarray  # int64
    bm_clusters: np.ndarray  # int64
    bm_kinds: np.ndarray  # uint8 Kind
    bm_index: np.ndarray  # int32 directory index, -1 = directory
    bm_source: np.ndarray  # int64 file offset of the referencing field
    findings: list[Finding] = field(default_factory=list)  # structures that could not be walked
    complete: bool = True  # False if some structure could not be walked
    _cum: np.ndarray | None = None

    # -- lookups --------------------------------------------------------------------

    def _cumulative(self) -> np.ndarray:
        if self._cum is None:
            self._cum = np.concatenate(([0], np.cumsum(self.weights, dtype=np.int64)))
        return self._cum

    def image_reference_counts(self, clusters: np.ndarray) -> np.ndarray:
        """References from non-bitmap structures to each of *clusters* (weights summed)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        lo = np.searchsorted(self.clusters, clusters, side="left")
        hi = np.searchsorted(self.clusters, clusters, side="right")
        cum = self._cumulative()
        return cum[hi] - cum[lo]

    def bitmap_reference_counts(self, clusters: np.ndarray) -> np.ndarray:
        """References from bitmap structures to each of *clusters*."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if not len(self.bm_clusters):
            return np.zeros(len(clusters), dtype=np.int64)
        order = np.sort(self.bm_clusters)
        return np.searchsorted(order, clusters, side="right") - np.searchsorted(
            order, clusters, side="left"
        )

    def reference_counts(self, clusters: np.ndarray) -> np.ndarray:
        """All references to each of *clusters*, as QEMU's check would count them."""
        return self.image_reference_counts(clusters) + self.bitmap_reference_counts(clusters)

    def image_kinds_at(self, cluster: int) -> list[Kind]:
        lo = int(np.searchsorted(self.clusters, cluster, side="left"))
        hi = int(np.searchsorted(self.clusters, cluster, side="right"))
        return sorted({Kind(int(k)) for k in self.kinds[lo:hi]})

    def bitmap_refs_at(self, cluster: int) -> list[BitmapRef]:
        hits = np.flatnonzero(self.bm_clusters == cluster)
        return [self._bm_ref(int(i)) for i in hits]

    def _bm_ref(self, i: int) -> BitmapRef:
        return BitmapRef(
            int(self.bm_clusters[i]),
            Kind(int(self.bm_kinds[i])),
            int(self.bm_index[i]),
            int(self.bm_source[i]),
        )

    def bitmap_clusters(self, index: int) -> np.ndarray:
        """Distinct clusters referenced by bitmap *index* (table and data; -1: the directory)."""
        return unique_sorted(self.bm_clusters[self.bm_index == index])

    def exclusive_clusters(self, index: int) -> np.ndarray:
        """Clusters of bitmap *index* that nothing else references and it references once."""
        mine = self.bm_clusters[self.bm_index == index]
        uniq, counts = np.unique(mine, return_counts=True)
        uniq = uniq[counts == 1]
        if not len(uniq):
            return uniq
        alone = self.reference_counts(uniq) == 1
        return uniq[alone]

    def referenced_mask(self) -> np.ndarray:
        """A bool per cluster inside the file: referenced by anything."""
        mask = np.zeros(self.file_clusters, dtype=bool)
        for arr in (self.clusters, self.bm_clusters):
            inside = arr[(arr >= 0) & (arr < self.file_clusters)]
            mask[inside] = True
        return mask


# -- building ---------------------------------------------------------------------------


_T = TypeVar("_T")
_S = TypeVar("_S")


def _in_order(
    fn: Callable[[int, _S], _T], count: int, workers: int, scratch: Callable[[], _S]
) -> Iterator[_T]:
    """``fn(k, scratch)`` for ``k`` in ``range(count)``, computed by *workers* threads, in order.

    Each worker owns one ``scratch()`` object.  The first exception (in order)
    is raised here; leaving the iteration early stops the workers.  With one
    worker or one item everything runs in this thread.
    """
    if workers <= 1 or count <= 1:
        own = scratch()
        for k in range(count):
            yield fn(k, own)
        return
    results: list[tuple[bool, object]] = [(False, None)] * count
    ready = [threading.Event() for _ in range(count)]
    take = itertools.count().__next__  # atomic under the GIL
    stop = threading.Event()

    def work() -> None:
        own = scratch()
        while not stop.is_set():
            k = take()
            if k >= count:
                return
            try:
                results[k] = (True, fn(k, own))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                results[k] = (False, exc)
            ready[k].set()

    threads = [
        threading.Thread(target=work, name="qbitmap-scan", daemon=True)
        for _ in range(min(workers, count))
    ]
    for t in threads:
        t.start()
    try:
        for k in range(count):
            ready[k].wait()
            ok, value = results[k]
            results[k] = (False, None)
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        for t in threads:
            t.join()


class _Builder:
    def __init__(self, image: Image, *, use_mmap: bool = True) -> None:
        self.image = image
        self.use_mmap = use_mmap
        self.cs = image.cluster_size
        self.cb = image.cluster_bits
        self.refs = _Refs()
        self.findings: list[Finding] = []
        self.complete = True
        header = image.header
        incompat = header.incompatible if header.version >= 3 else IncompatibleFeature(0)
        self.extended_l2 = bool(incompat & IncompatibleFeature.EXTENDED_L2)
        self.external_data = bool(incompat & IncompatibleFeature.EXTERNAL_DATA_FILE)
        self.l2_entries = self.cs // (16 if self.extended_l2 else 8)
        # L2 table offset -> number of L1 entries (active and snapshots) pointing at it.
        self.l2_weights: dict[int, int] = {}
        self.l1_bytes_read = 0

    def problem(self, code: str, message: str, offset: int | None, fld: str) -> None:
        self.findings.append(Finding(code, message, offset=offset, field=fld))
        self.complete = False

    def inside(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.image.file_size

    # -- refcount structure --------------------------------------------------------

    def refcount_structure(self) -> np.ndarray | None:
        """Add the refcount table and blocks; return the refcounts of the file's clusters."""
        image, header, cs = self.image, self.image.header, self.cs
        order = header.effective_refcount_order
        off, nclus = header.refcount_table_offset, header.refcount_table_clusters
        reason = None
        if order > 6:
            reason = f"refcount_order is {order}, the largest allowed is 6"
            where, fld = 96, "refcount_order"
        elif nclus == 0:
            reason = "refcount_table_clusters is 0"
            where, fld = 56, "refcount_table_clusters"
        elif nclus * cs > QCOW_MAX_REFTABLE_SIZE:
            reason = f"the refcount table of {nclus} clusters exceeds QEMU's limit of 8 MiB"
            where, fld = 56, "refcount_table_clusters"
        elif off % cs or off == 0:
            reason = (
                f"refcount_table_offset {off:#x} is not a non-zero multiple of the cluster size"
            )
            where, fld = 48, "refcount_table_offset"
        elif not self.inside(off, nclus * cs):
            reason = f"the refcount table ({nclus} clusters at {off:#x}) extends past the end of the file"
            where, fld = 48, "refcount_table_offset"
        if reason is not None:
            self.problem(
                "refcount-table-invalid", f"{reason}: refcounts cannot be read", where, fld
            )
            return None
        self.refs.add_range(off, nclus * cs, Kind.REFCOUNT_TABLE, self.cb)
        table = np.frombuffer(image.read(off, nclus * cs, what="refcount table"), ">u8").astype(
            np.uint64
        )
        epb = cs * 8 >> order
        file_clusters = -(-image.file_size // cs)
        blocks_needed = -(-file_clusters // epb)
        nz = np.flatnonzero(table)
        offsets = table[nz] & np.uint64(layout.REFT_OFFSET_MASK)
        reserved = (table[nz] & np.uint64(layout.REFT_RESERVED_MASK)) != 0
        bad = ((offsets % np.uint64(cs)) != 0) | (offsets > np.uint64(max(0, image.file_size - cs)))
        flagged = bad | reserved
        if flagged.any():
            i = int(nz[np.flatnonzero(flagged)[0]])
            count = int(flagged.sum())
            self.problem(
                "refcount-block-invalid",
                f"refcount table entry {i} is {int(table[i]):#x}: reserved bits are set, or the block "
                "is unaligned or outside the file"
                + ("" if count == 1 else f" ({count - 1} more entries likewise)"),
                off + 8 * i,
                "refcount table entry",
            )
        good = nz[~bad]
        good_offsets = offsets[~bad].astype(np.int64)
        self.refs.add(good_offsets >> self.cb, Kind.REFCOUNT_BLOCK)
        dtype = {
            0: np.uint8,
            1: np.uint8,
            2: np.uint8,
            3: np.uint8,
            4: np.uint16,
            5: np.uint32,
        }.get(order, np.uint64)
        counts = np.zeros(blocks_needed * epb, dtype=dtype)
        wanted = good < blocks_needed
        for t, block in self._read_clusters(good[wanted], good_offsets[wanted]):
            counts[t * epb : (t + 1) * epb] = decode_refcount_block(block, order).astype(dtype)
        return counts[:file_clusters]

    def _read_clusters(self, keys: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[int, bytes]]:
        """Yield (key, cluster bytes) for clusters at *offsets*, reading contiguous runs at once."""
        if not len(offsets):
            return
        order = np.argsort(offsets, kind="stable")
        keys, offsets = keys[order], offsets[order]
        cs = self.cs
        per_batch = max(1, READ_BATCH // cs)
        i = 0
        n = len(offsets)
        while i < n:
            j = i + 1
            while j < n and j - i < per_batch and offsets[j] == offsets[j - 1] + cs:
                j += 1
            start = int(offsets[i])
            data = self.image.read(start, (j - i) * cs, what="metadata clusters")
            for k in range(i, j):
                rel = int(offsets[k]) - start
                yield int(keys[k]), data[rel : rel + cs]
            i = j

    # -- L1/L2 and guest data -------------------------------------------------------

    def l1_table(self, offset: int, size: int, *, active: bool, where: int, label: str) -> None:
        cs = self.cs
        nbytes = size * 8
        if size == 0:
            return
        reason = None
        if nbytes > QCOW_MAX_L1_SIZE:
            reason = (
                f"{label} has {size} entries, more than QEMU's limit of {QCOW_MAX_L1_SIZE // 8}"
            )
        elif offset % cs or offset == 0:
            reason = f"{label} offset {offset:#x} is not a non-zero multiple of the cluster size"
        elif not self.inside(offset, nbytes):
            reason = f"{label} ({nbytes} bytes at {offset:#x}) extends past the end of the file"
        elif not active and self.l1_bytes_read + nbytes > self.image.file_size:
            reason = f"{label} would take the snapshots' L1 tables past the size of the file"
        if reason is not None:
            code = "l1-table-invalid" if active else "snapshot-table-invalid"
            self.problem(code, reason, where, "l1_table_offset")
            return
        self.l1_bytes_read += nbytes
        self.refs.add_range(offset, nbytes, Kind.L1 if active else Kind.SNAPSHOT_L1, self.cb)
        l1 = np.frombuffer(self.image.read(offset, nbytes, what=label), ">u8").astype(np.uint64)
        nz = np.flatnonzero(l1 & np.uint64(layout.L1E_OFFSET_MASK))
        l2_offsets = (l1[nz] & np.uint64(layout.L1E_OFFSET_MASK)).astype(np.int64)
        bad = (l2_offsets % cs != 0) | (l2_offsets > self.image.file_size - cs)
        if bad.any():
            i = int(nz[np.flatnonzero(bad)[0]])
            count = int(bad.sum())
            self.problem(
                "l2-table-invalid",
                f"entry {i} of {label} points at an L2 table at {int(l2_offsets[np.flatnonzero(bad)[0]]):#x} "
                f"that is unaligned or outside the file"
                + ("" if count == 1 else f" ({count - 1} more entries likewise)"),
                offset + 8 * i,
                "L1 entry",
            )
        uniq, counts = np.unique(l2_offsets[~bad], return_counts=True)
        for off, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            self.l2_weights[off] = self.l2_weights.get(off, 0) + c

    def _windows(self, offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
        """For sorted cluster *offsets* (all inside the file): ``(i, j, start, length)`` windows.

        Clusters ``offsets[i:j]`` lie contiguously in the file at ``start``
        (``length`` bytes, at most :data:`SCAN_WINDOW` or one cluster).
        """
        cs = self.cs
        n = len(offsets)
        if not n:
            return []
        per = max(1, SCAN_WINDOW // cs)
        breaks = np.flatnonzero(np.diff(offsets) != cs) + 1
        bounds = [0, *breaks.tolist(), n]
        out = []
        for r in range(len(bounds) - 1):
            for i in range(bounds[r], bounds[r + 1], per):
                j = min(bounds[r + 1], i + per)
                out.append((i, j, int(offsets[i]), (j - i) * cs))
        return out

    def _window_words(self, start: int, length: int) -> np.ndarray:
        """The window's bytes as uint64 in file byte order (big-endian bytes viewed natively).

        A word is zero exactly when the big-endian value is, and only the few
        non-zero words need byte-swapping.  The file is mapped a window at a
        time -- its pages mapped in the same call (``MAP_POPULATE``), far
        cheaper than faulting them in one by one -- so no copy is made and
        memory stays bounded (the window is unmapped once the caller drops the
        array and views of it).  Mapping is only safe while nobody truncates
        the file, so a live image is read with ``pread`` instead.
        """
        if not self.use_mmap:
            data = self.image.read(start, length, what="metadata clusters")
            return np.frombuffer(data, dtype=np.uint64)
        gran = mmap.ALLOCATIONGRANULARITY
        base = start - start % gran
        window = mmap.mmap(
            self.image.fd,
            start - base + length,
            flags=mmap.MAP_SHARED | _MAP_POPULATE,
            prot=mmap.PROT_READ,
            offset=base,
        )
        return np.frombuffer(window, dtype=np.uint64, count=length // 8, offset=start - base)

    def _nonzero_words(
        self, offsets: np.ndarray, step: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(i, positions, values)`` of the non-zero words (every *step*-th) of each window.

        Most L2 entries are zero: one vectorised comparison finds the others,
        and only those are byte-swapped and looked at.  Windows are scanned by
        :data:`SCAN_WORKERS` threads (mapping, comparing and ``pread`` release
        the GIL, so both cores read) and yielded in file order.
        """
        windows = self._windows(offsets)

        def scan(k: int, mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
            i, _j, start, length = windows[k]
            words = self._window_words(start, length)
            if step != 1:
                words = words[0::step]
            n = len(words)
            np.not_equal(words, 0, out=mask[:n])
            hits = np.flatnonzero(mask[:n])
            values = words[hits].byteswap()  # a copy: the window can go
            del words
            return i, hits, values

        lengths = [length for *_rest, length in windows]
        mask_words = max(lengths, default=0) // 8
        # Threads pay off only when there is a lot to read (starting them costs about a millisecond).
        total = sum(lengths)
        workers = SCAN_WORKERS if total >= PARALLEL_SCAN_BYTES else 1
        yield from _in_order(scan, len(windows), workers, lambda: np.empty(mask_words, bool))

    def l2_tables(self) -> None:
        if not self.l2_weights:
            return
        offsets = np.fromiter(self.l2_weights.keys(), dtype=np.int64, count=len(self.l2_weights))
        weights = np.fromiter(self.l2_weights.values(), dtype=np.int64, count=len(self.l2_weights))
        self.refs.add(offsets >> self.cb, Kind.L2, weights)
        order = np.argsort(offsets)
        offsets, weights = offsets[order], weights[order]
        cb = self.cb
        per_table = self.l2_entries
        compressed_shift = 62 - (cb - 8)
        csize_mask = np.uint64((1 << (cb - 8)) - 1)
        coffset_mask = np.uint64((1 << compressed_shift) - 1)
        for i, hits, values in self._nonzero_words(offsets, 2 if self.extended_l2 else 1):
            if not len(hits):
                continue
            w = weights[i + hits // per_table]
            compressed = (values >> np.uint64(62)) & np.uint64(1) == 1
            if not compressed.any():
                host = values & np.uint64(layout.L2E_OFFSET_MASK)
                keep = host != 0
                if not self.external_data and keep.any():
                    self.refs.add(
                        (host[keep] >> np.uint64(cb)).astype(np.int64), Kind.DATA, w[keep]
                    )
                continue
            std, std_w = values[~compressed], w[~compressed]
            host = std & np.uint64(layout.L2E_OFFSET_MASK)
            keep = host != 0
            if not self.external_data:
                self.refs.add(
                    (host[keep] >> np.uint64(cb)).astype(np.int64), Kind.DATA, std_w[keep]
                )
            cw, cwt = values[compressed], w[compressed]
            coff = cw & coffset_mask
            nsec = ((cw >> np.uint64(compressed_shift)) & csize_mask) + np.uint64(1)
            first_byte = (coff & ~np.uint64(511)).astype(np.int64)
            last_byte = first_byte + nsec.astype(np.int64) * 512 - 1
            first = first_byte >> cb
            span = (last_byte >> cb) - first + 1
            for k in range(int(span.max())):
                sel = span > k
                self.refs.add(first[sel] + k, Kind.COMPRESSED, cwt[sel])

    # -- snapshots ----------------------------------------------------------------------

    def snapshots(self) -> None:
        header = self.image.header
        count, offset = header.nb_snapshots, header.snapshots_offset
        if offset % self.cs or offset + 40 * count > 0x7FFFFFFFFFFFFFFF:
            # QEMU validates the offset even when there are no snapshots.
            self.problem(
                "snapshot-table-invalid",
                f"snapshots_offset {offset:#x} is not cluster aligned or too large (QEMU: 'Snapshot "
                "table offset invalid')",
                64,
                "snapshots_offset",
            )
            return
        if count == 0:
            return
        if count > QCOW_MAX_SNAPSHOTS:
            self.problem(
                "snapshot-table-invalid",
                f"nb_snapshots is {count}, QEMU's limit is {QCOW_MAX_SNAPSHOTS}",
                60,
                "nb_snapshots",
            )
            return
        if offset % self.cs or offset == 0 or offset >= self.image.file_size:
            self.problem(
                "snapshot-table-invalid",
                f"snapshots_offset {offset:#x} is not a cluster-aligned offset inside the file",
                64,
                "snapshots_offset",
            )
            return
        limit = min(QCOW_MAX_SNAPSHOT_TABLE_BYTES, self.image.file_size - offset)
        buf = b""
        pos = 0
        l1s: list[tuple[int, int, int]] = []
        for n in range(count):
            need = pos + 40
            if need > len(buf):
                buf = self._grow(offset, buf, need, limit)
            if need > len(buf):
                self._snapshot_cut(n, offset + pos)
                return
            l1_off, l1_size, id_size, name_size = struct.unpack_from(">QIHH", buf, pos)
            extra_size = struct.unpack_from(">I", buf, pos + 36)[0]
            if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                self.problem(
                    "snapshot-table-invalid",
                    f"snapshot table entry {n} has {extra_size} bytes of extra data, QEMU allows "
                    f"{QCOW_MAX_SNAPSHOT_EXTRA_DATA} (QEMU: 'Too much extra metadata')",
                    offset + pos + 36,
                    "extra_data_size",
                )
                return
            full = pos + 40 + extra_size + id_size + name_size
            full += -full % 8
            if full > len(buf):
                buf = self._grow(offset, buf, full, limit)
            if full > len(buf):
                self._snapshot_cut(n, offset + pos)
                return
            l1s.append((l1_off, l1_size, offset + pos))
            pos = full
        self.refs.add_range(offset, pos, Kind.SNAPSHOT_TABLE, self.cb)
        for n, (l1_off, l1_size, where) in enumerate(l1s):
            self.l1_table(
                l1_off, l1_size, active=False, where=where, label=f"the L1 table of snapshot {n}"
            )

    def _grow(self, offset: int, buf: bytes, need: int, limit: int) -> bytes:
        if need > limit:
            return buf
        want = min(limit, max(need, 2 * len(buf), 65536))
        return self.image.read(offset, want, what="snapshot table")

    def _snapshot_cut(self, n: int, where: int) -> None:
        self.problem(
            "snapshot-table-invalid",
            f"snapshot table entry {n} runs past the end of the file or QEMU's 64 MiB limit",
            where,
            "snapshot table",
        )

    # -- encryption ------------------------------------------------------------------------

    def crypto(self) -> None:
        image = self.image
        ext = image.extension(layout.EXT_CRYPTO)
        method = image.header.crypt_method
        if ext is None:
            if method == 2:
                self.problem(
                    "encryption-header-invalid",
                    "the image uses LUKS encryption but has no encryption header pointer extension",
                    32,
                    "crypt_method",
                )
            return
        if len(ext.data) != 16:
            self.problem(
                "encryption-header-invalid",
                f"the encryption header pointer extension has length {len(ext.data)}, it must be 16",
                ext.offset + 4,
                "length",
            )
            return
        off, length = struct.unpack(">QQ", ext.data)
        if method != 2:
            self.problem(
                "encryption-header-invalid",
                f"an encryption header pointer is present but crypt_method is {method}, not 2 (LUKS)",
                ext.offset,
                "crypt_method",
            )
        if off % self.cs or not self.inside(off, length):
            self.problem(
                "encryption-header-invalid",
                f"the encryption header ({length} bytes at {off:#x}) is unaligned or outside the file",
                ext.data_offset,
                "crypto header offset",
            )
            return
        self.refs.add_range(off, -(-length // self.cs) * self.cs, Kind.CRYPTO_HEADER, self.cb)


def _bitmap_refs(
    image: Image,
    directory: tuple[int, int, int] | None,
    entries: list[BitmapEntry],
    tables: dict[int, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from qbitmap.check.tables import valid_data_entries

    cb, cs = image.cluster_bits, image.cluster_size
    parts_c: list[np.ndarray] = []
    parts_k: list[np.ndarray] = []
    parts_i: list[np.ndarray] = []
    parts_s: list[np.ndarray] = []

    def add(clusters: np.ndarray, kind: Kind, index: int, sources: np.ndarray | int) -> None:
        parts_c.append(np.asarray(clusters, dtype=np.int64))
        parts_k.append(np.full(len(clusters), int(kind), dtype=np.uint8))
        parts_i.append(np.full(len(clusters), index, dtype=np.int32))
        if isinstance(sources, int):
            parts_s.append(np.full(len(clusters), sources, dtype=np.int64))
        else:
            parts_s.append(np.asarray(sources, dtype=np.int64))

    if directory is not None:
        off, size, source = directory
        if size > 0:
            add(
                np.arange(off >> cb, ((off + size - 1) >> cb) + 1),
                Kind.BITMAP_DIRECTORY,
                -1,
                source,
            )
    for entry in entries:
        off, n = entry.bitmap_table_offset, entry.bitmap_table_size
        if off == 0 or off % cs or n == 0 or n * 8 > image.file_size:
            continue
        add(
            np.arange(off >> cb, ((off + n * 8 - 1) >> cb) + 1),
            Kind.BITMAP_TABLE,
            entry.index,
            entry.offset,
        )
        table = tables.get(entry.index)
        if table is None:
            continue
        idx, offsets = valid_data_entries(table, cs)
        add(
            (offsets >> np.uint64(cb)).astype(np.int64),
            Kind.BITMAP_DATA,
            entry.index,
            off + 8 * idx.astype(np.int64),
        )
    if not parts_c:
        return _EMPTY_I64, np.zeros(0, np.uint8), np.zeros(0, np.int32), _EMPTY_I64
    return (
        np.concatenate(parts_c),
        np.concatenate(parts_k),
        np.concatenate(parts_i),
        np.concatenate(parts_s),
    )


def build(
    image: Image,
    *,
    directory: tuple[int, int, int] | None = None,
    entries: list[BitmapEntry] | None = None,
    tables: dict[int, np.ndarray] | None = None,
    use_mmap: bool = True,
) -> tuple[ReferenceMap, np.ndarray | None]:
    """Build the reference map and read the refcounts of the file's clusters.

    *directory* is ``(offset, size, field offset)`` of a bitmap directory QEMU
    would load, *entries* its entries and *tables* their tables; leave them
    out for a map of the image without bitmaps.
    """
    b = _Builder(image, use_mmap=use_mmap)
    header = image.header
    b.refs.add(np.array([0], dtype=np.int64), Kind.HEADER)
    refcounts = b.refcount_structure()
    needed = -(-header.size // (b.cs * b.l2_entries)) if header.size else 0
    if header.l1_size < needed:
        b.problem(
            "l1-table-invalid",
            f"l1_size is {header.l1_size}, a disk of {header.size} bytes needs at least {needed} "
            "entries (QEMU: 'L1 table is too small')",
            36,
            "l1_size",
        )
    b.l1_table(
        header.l1_table_offset, header.l1_size, active=True, where=40, label="the active L1 table"
    )
    b.snapshots()
    b.l2_tables()
    b.crypto()
    clusters, kinds, weights = b.refs.arrays()
    order = np.argsort(clusters, kind="stable")
    bm = _bitmap_refs(image, directory, entries or [], tables or {})
    refmap = ReferenceMap(
        cluster_size=b.cs,
        cluster_bits=b.cb,
        file_clusters=-(-image.file_size // b.cs),
        clusters=clusters[order],
        kinds=kinds[order],
        weights=weights[order],
        bm_clusters=bm[0],
        bm_kinds=bm[1],
        bm_index=bm[2],
        bm_source=bm[3],
        findings=b.findings,
        complete=b.complete,
    )
    return refmap, refcounts


def reference_map(image: Image, *, use_mmap: bool = True) -> ReferenceMap:
    """Every reference in *image*, bitmaps included when QEMU would load them.

    Never raises for corruption: structures that cannot be walked are left out
    and described in ``ReferenceMap.findings`` (``complete`` is then False).
    """
    from qbitmap.check.directory import directory_readable, scan_directory
    from qbitmap.check.tables import read_tables

    ext = image.bitmaps_extension if _bitmaps_extension_usable(image) else None
    if ext is None or not directory_readable(image, ext):
        return build(image, use_mmap=use_mmap)[0]
    entries = scan_directory(image, ext).entries
    tables = read_tables(image, entries)
    directory = (ext.bitmap_directory_offset, ext.bitmap_directory_size, ext.offset + 16)
    return build(image, directory=directory, entries=entries, tables=tables, use_mmap=use_mmap)[0]


def _bitmaps_extension_usable(image: Image) -> bool:
    header = image.header
    if header.version < 3 or not (header.autoclear_features or 0) & 1:
        return False
    ext = image.extension(layout.EXT_BITMAPS)
    return ext is not None and len(ext.data) == 24


# -- findings ----------------------------------------------------------------------------


def _kind_word(kind: Kind) -> str:
    return {
        Kind.BITMAP_DIRECTORY: "directory",
        Kind.BITMAP_TABLE: "table",
        Kind.BITMAP_DATA: "data",
    }[kind]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _owner_text(refmap: ReferenceMap, ref: BitmapRef, names: dict[int, str]) -> str:
    others = [k.phrase for k in refmap.image_kinds_at(ref.cluster)]
    for other in refmap.bitmap_refs_at(ref.cluster):
        if other == ref:
            continue
        if other.kind == Kind.BITMAP_DIRECTORY:
            others.append("the bitmap directory")
        elif other.bitmap == ref.bitmap and other.kind == ref.kind:
            others.append(f"another {_kind_word(other.kind)} reference of the same bitmap")
        else:
            others.append(
                f"the {_kind_word(other.kind)} of bitmap {names.get(other.bitmap, '?')!r}"
            )
    seen: list[str] = []
    for o in others:
        if o not in seen:
            seen.append(o)
    return " and ".join(seen) or "something else"


def bitmap_cluster_findings(
    refmap: ReferenceMap,
    refcounts: np.ndarray | None,
    entries: list[BitmapEntry],
    *,
    compare_refcounts: bool,
) -> Iterator[Finding]:
    """Overlaps, zero refcounts and leaks of the clusters of bitmap structures."""
    if not len(refmap.bm_clusters):
        return
    names = {e.index: e.display_name for e in entries}
    clusters = refmap.bm_clusters
    total = refmap.reference_counts(clusters)
    if refcounts is not None and compare_refcounts:
        inside = clusters < len(refcounts)
        rc = np.zeros(len(clusters), dtype=np.int64)
        rc[inside] = refcounts[clusters[inside]].astype(np.int64)
    else:
        inside = np.zeros(len(clusters), dtype=bool)
        rc = np.zeros(len(clusters), dtype=np.int64)
    overlap = total > 1
    unallocated = ~overlap & inside & (rc == 0)
    leaked = ~overlap & inside & (rc > total)
    for code, mask in (
        ("bitmap-cluster-overlap", overlap),
        ("bitmap-cluster-unallocated", unallocated),
        ("bitmap-cluster-leaked", leaked),
    ):
        hits = np.flatnonzero(mask)
        if not len(hits):
            continue
        groups: dict[tuple[int, int], list[int]] = {}
        for i in hits.tolist():
            groups.setdefault((int(refmap.bm_index[i]), int(refmap.bm_kinds[i])), []).append(i)
        for (index, kind_value), rows in sorted(groups.items()):
            kind = Kind(kind_value)
            first = min(rows, key=lambda r: (int(refmap.bm_clusters[r]), int(refmap.bm_source[r])))
            ref = refmap._bm_ref(first)
            cluster_off = ref.cluster << refmap.cluster_bits
            n = len({int(refmap.bm_clusters[r]) for r in rows})
            owner = (
                "the bitmap directory"
                if index < 0
                else f"the {_kind_word(kind)} of bitmap {names.get(index, '?')!r}"
            )
            one = n == 1
            what = _plural(n, "cluster")
            if code == "bitmap-cluster-overlap":
                msg = (
                    f"{what} of {owner} {'is' if one else 'are'} also used elsewhere: the one at "
                    f"{cluster_off:#x} is "
                    f"also used by {_owner_text(refmap, ref, names)}"
                )
            elif code == "bitmap-cluster-unallocated":
                msg = (
                    f"{what} of {owner} {'has' if one else 'have'} refcount 0 (the first at "
                    f"{cluster_off:#x}), so QEMU may "
                    "hand them out for other data"
                )
            else:
                msg = (
                    f"{what} of {owner} {'has a refcount above its' if one else 'have a refcount above their'} "
                    "references (the one at "
                    f"{cluster_off:#x} has {int(rc[first])}, referenced {int(total[first])} time"
                    f"{'' if int(total[first]) == 1 else 's'}); 'qemu-img check -r leaks' fixes this"
                )
            fld = {
                Kind.BITMAP_DIRECTORY: "bitmap_directory_offset",
                Kind.BITMAP_TABLE: "bitmap_table_offset",
                Kind.BITMAP_DATA: "bitmap table entry",
            }[kind]
            yield Finding(
                code,
                msg,
                offset=ref.source,
                field=fld,
                bitmap=None if index < 0 else names.get(index),
                area="bitmaps" if index < 0 else "bitmap",
                bitmap_index=None if index < 0 else index,
            )


def _ignored_extension(
    ctx: Context, refmap: ReferenceMap, refcounts: np.ndarray | None
) -> Iterator[Finding]:
    """Autoclear bit 0 clear (or a v2 image): QEMU drops the extension; its clusters leak."""
    from qbitmap.check.directory import directory_readable, scan_directory
    from qbitmap.check.tables import read_tables

    ext = ctx.extension
    if ext is None or ctx.honored:
        return
    image = ctx.image
    entries: list[BitmapEntry] = []
    leaked = 0
    leaked_clusters = _EMPTY_I64
    if directory_readable(image, ext) and ext.bitmap_directory_offset % image.cluster_size == 0:
        entries = scan_directory(image, ext).entries
        tables = read_tables(image, entries)
        bm = _bitmap_refs(
            image, (ext.bitmap_directory_offset, ext.bitmap_directory_size, 0), entries, tables
        )
        uniq = unique_sorted(bm[0])
        if refcounts is not None:
            uniq = uniq[uniq < len(refcounts)]
            rc = refcounts[uniq].astype(np.int64)
            mask = rc > refmap.image_reference_counts(uniq)
            leaked_clusters = uniq[mask]
            leaked = len(leaked_clusters)
    ctx.ignored_leaks = leaked_clusters
    v2 = image.header.version < 3
    names = ", ".join(repr(e.display_name) for e in entries[:5]) + (
        ", ..." if len(entries) > 5 else ""
    )
    held = f" ({names})" if entries else ""
    if v2:
        yield Finding(
            "bitmaps-extension-v2",
            f"this version 2 image has a bitmaps extension with {_plural(ext.nb_bitmaps, 'bitmap')}{held}; "
            f"QEMU ignores it and drops it on its next write, leaking {_plural(leaked, 'cluster')}",
            offset=ext.offset - 8,
            field="bitmaps extension",
            area="bitmaps",
        )
    else:
        yield Finding(
            "bitmaps-extension-ignored",
            f"autoclear bit 0 is clear, so QEMU ignores the bitmaps extension "
            f"({_plural(ext.nb_bitmaps, 'bitmap')}{held}) and drops it on its next write; "
            f"{_plural(leaked, 'cluster')} of it {'is' if leaked == 1 else 'are'} leaked "
            "('qemu-img check -r leaks' frees them)",
            offset=88,
            field="autoclear_features",
            area="bitmaps",
        )
    for entry in entries:
        yield Finding(
            "bitmap-ignored",
            f"bitmap {entry.display_name!r} is lost to QEMU because its extension is ignored: "
            "recreate it and take a full backup",
            offset=entry.offset,
            field="bitmap directory entry",
            bitmap=entry.display_name,
            area="bitmaps",
        )


def image_refcount_findings(
    refmap: ReferenceMap,
    refcounts: np.ndarray,
    *,
    exclude: np.ndarray | None,
    report_leaks: bool,
) -> Iterator[Finding]:
    """Refcounts against references for every cluster of the file outside the bitmaps.

    A refcount below the references is corruption (QEMU could free or reuse a
    cluster still in use); above them is a leak, only a note here: leaks outside
    the bitmaps are ``qemu-img check``'s business.
    """
    n = len(refcounts)
    inside = (refmap.clusters >= 0) & (refmap.clusters < n)
    refs = np.bincount(refmap.clusters[inside], weights=refmap.weights[inside], minlength=n)
    refs = refs[:n].astype(np.int64)
    bm = refmap.bm_clusters[(refmap.bm_clusters >= 0) & (refmap.bm_clusters < n)]
    refs += np.bincount(bm, minlength=n)[:n]
    skip = np.zeros(n, dtype=bool)
    skip[bm] = True
    if exclude is not None and len(exclude):
        skip[exclude[exclude < n]] = True
    rc = refcounts.astype(np.int64)
    low = np.flatnonzero((refs > rc) & ~skip)
    if len(low):
        i = int(low[0])
        yield Finding(
            "image-refcount-too-low",
            f"{_plural(len(low), 'cluster')} outside the bitmaps "
            f"{'is' if len(low) == 1 else 'are'} referenced more often than the refcount says (the one at {i << refmap.cluster_bits:#x} has refcount {int(rc[i])} "
            f"and {int(refs[i])} references, as {_kinds_phrase(refmap, i)}); QEMU could reuse them",
            offset=i << refmap.cluster_bits,
            field="refcount",
        )
    if not report_leaks:
        return
    leaked = np.flatnonzero((rc > refs) & ~skip)
    if len(leaked):
        i = int(leaked[0])
        yield Finding(
            "image-clusters-leaked",
            f"{_plural(len(leaked), 'cluster')} outside the bitmaps "
            f"{'has a refcount above its' if len(leaked) == 1 else 'have a refcount above their'} "
            f"references (the first at {i << refmap.cluster_bits:#x}); 'qemu-img check -r leaks' "
            "frees them",
            offset=i << refmap.cluster_bits,
            field="refcount",
        )


def _kinds_phrase(refmap: ReferenceMap, cluster: int) -> str:
    return " and ".join(k.phrase for k in refmap.image_kinds_at(cluster)) or "nothing"


def check(ctx: Context) -> Iterator[Finding]:
    image = ctx.image
    ext = ctx.extension
    directory = None
    if ext is not None and ctx.honored and ctx.directory_readable:
        directory = (ext.bitmap_directory_offset, ext.bitmap_directory_size, ext.offset + 16)
    refmap, refcounts = build(
        image, directory=directory, entries=ctx.entries, tables=ctx.tables, use_mmap=not ctx.live
    )
    ctx.refmap, ctx.refcounts = refmap, refcounts
    yield from refmap.findings
    dirty = image.header.version >= 3 and bool(
        (image.header.incompatible_features or 0) & IncompatibleFeature.DIRTY
    )
    yield from bitmap_cluster_findings(refmap, refcounts, ctx.entries, compare_refcounts=not dirty)
    yield from _ignored_extension(ctx, refmap, refcounts)
    unparsed = ext is None and image.extension(layout.EXT_BITMAPS) is not None
    bitmaps_walked = not unparsed and (
        (ext is None or not ctx.honored)
        or (ctx.directory_complete and all(e.index in ctx.tables for e in ctx.entries))
    )
    if refcounts is not None and not dirty:
        yield from image_refcount_findings(
            refmap,
            refcounts,
            exclude=ctx.ignored_leaks,
            report_leaks=refmap.complete and bitmaps_walked and image.extension_error is None,
        )
