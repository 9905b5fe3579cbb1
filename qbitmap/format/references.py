"""Who references which cluster of a qcow2 image, and what is wrong with each reference.

:func:`walk` visits every structure that owns clusters the way QEMU's
``qemu-img check`` does (block/qcow2-refcount.c ``calculate_refcounts``): the
header cluster, the refcount table and its blocks, the active L1 table, its L2
tables and their guest data (compressed data counted on every host cluster it
touches), the snapshot table and every snapshot's L1/L2/data, the LUKS header,
and -- when the caller passes them -- the bitmap directory, tables and data.

It returns a :class:`ReferenceMap`: every reference as numpy arrays (overlaps
and counts come from sorting and ``searchsorted``, never a Python loop over
clusters), the refcounts stored in the image, and the :class:`Defect` list:
everything about a single reference that QEMU's check counts as corruption --
a table location QEMU refuses, reserved bits in L1 and L2 entries, unaligned
offsets, a referenced region starting at or past the end of the file, a
compressed entry with the COPIED flag or subcluster bits, an active L1/L2
entry whose COPIED flag disagrees with "refcount is exactly 1".  Comparing
reference counts with refcounts (too low, leaked, overlapping) is a rule over
the whole map and is left to ``qbitmap.check``.

Every read is bounded by the file: tables must lie inside it, each L2 table
is read once however many L1 entries point at it, the L1 tables of snapshots
together may not claim more bytes than the file holds, and reads go through
``pread`` into reused buffers (a mapping would turn an I/O error into SIGBUS).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from qbitmap.format import entries as ent
from qbitmap.format import layout
from qbitmap.format.bitmap import unique_sorted
from qbitmap.format.entries import ClusterType, valid_data_entries
from qbitmap.format.image import Image
from qbitmap.format.layout import QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE
from qbitmap.format.model import BitmapStructures, IncompatibleFeature, crypto_header_pointer
from qbitmap.parallel import WORKERS, ordered_map

H = layout.HEADER_FIELD
# Contiguous metadata clusters (refcount blocks) are read together, this much at a time.
READ_BATCH = 16 << 20
# L2 tables are scanned a window of this many contiguous bytes at a time; windows are
# read and searched for non-zero entries by parallel.WORKERS threads when there is at
# least PARALLEL_SCAN_BYTES to scan (starting threads costs about a millisecond).
SCAN_WINDOW = 8 << 20
PARALLEL_SCAN_BYTES = 8 << 20
# Refcounts of clusters past the end of the file kept one by one, at most: a killed
# writer leaves a few; a refcount block of garbage could name millions (they are counted).
PAST_EOF_KEPT = 1 << 16


class Kind(enum.IntEnum):
    """What holds a reference."""

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


class DefectKind(enum.Enum):
    """Classes of defects in the references of an image (``qbitmap.check`` words them)."""

    REFCOUNT_TABLE = "refcount-table"  # refcounts cannot be read at all
    REFCOUNT_TABLE_ENTRY = "refcount-table-entry"  # reserved bits, unaligned, outside the file
    L1_TABLE = "l1-table"  # the active L1 table's location or size
    L1_ENTRY = "l1-entry"  # reserved bits, no offset, unaligned or outside the file
    L2_ENTRY = "l2-entry"  # reserved bits, unaligned data, bad compressed or subcluster bits
    PAST_EOF = "past-eof"  # a referenced region starts at or past the end of the file
    SNAPSHOT_TABLE = "snapshot-table"  # the snapshot table or a snapshot's L1 table
    CRYPTO_HEADER = "crypto-header"
    COPIED_FLAG = "copied-flag"  # OFLAG_COPIED disagrees with "refcount is exactly 1"


@dataclass(frozen=True, slots=True)
class Defect:
    """A class of bad references: the first one found (file order) and how many there are."""

    kind: DefectKind
    cls: str  # the class within the kind ("reserved", "unaligned", ...)
    reason: str  # what is wrong with the first one, no trailing period
    offset: int | None  # file offset of the field at fault
    field: str
    count: int = 1


class _Defects:
    """Counts defects per (kind, class) and keeps the first of each, in file order."""

    def __init__(self) -> None:
        self.found: dict[tuple[DefectKind, str], Defect] = {}

    def add(
        self, kind: DefectKind, cls: str, reason: str, offset: int | None, fld: str, n: int = 1
    ) -> None:
        if n <= 0:
            return
        key = (kind, cls)
        old = self.found.get(key)
        if old is None:
            self.found[key] = Defect(kind, cls, reason, offset, fld, n)
        else:
            self.found[key] = Defect(kind, cls, old.reason, old.offset, old.field, old.count + n)

    def list(self) -> list[Defect]:
        return list(self.found.values())


@dataclass(frozen=True, slots=True)
class BitmapRef:
    """One reference from a bitmap structure to a cluster."""

    cluster: int
    kind: Kind  # BITMAP_DIRECTORY, BITMAP_TABLE or BITMAP_DATA
    bitmap: int  # directory index; -1 for the directory
    source: int  # file offset of the field holding the reference


_EMPTY_I64 = np.zeros(0, dtype=np.int64)


@dataclass
class ReferenceMap:
    """Every reference to every cluster of an image, and the refcounts it stores.

    Non-bitmap references are ``clusters``/``kinds``/``weights`` (a weight is
    how many times the reference counts: an L2 table shared by the active L1
    and two snapshots has weight 3).  Bitmap references are kept one per
    reference with the bitmap's directory index and the file offset of the
    field that points at the cluster.  ``refcounts`` holds the stored refcount
    of every cluster that starts inside the file (None when the refcount
    structure cannot be read); ``complete`` is False when some structure could
    not be walked (its defect says which).  ``past_eof_clusters`` and
    ``past_eof_refcounts`` are the clusters past the end of the file whose
    stored refcount is not 0, with those refcounts (uint64): a writer killed
    between counting a cluster and writing it leaves them.  QEMU's check does
    not look past the end of the file; its allocator skips them when the file
    grows, and they are leaks from then on.
    """

    cluster_size: int
    cluster_bits: int
    file_clusters: int  # clusters that start inside the file
    max_refcount: int
    clusters: np.ndarray  # int64, sorted
    kinds: np.ndarray  # uint8 Kind
    weights: np.ndarray  # int64
    bm_clusters: np.ndarray  # int64
    bm_kinds: np.ndarray  # uint8 Kind
    bm_index: np.ndarray  # int32 directory index, -1 = directory
    bm_source: np.ndarray  # int64 file offset of the referencing field
    refcounts: np.ndarray | None = None
    refcount_blocks: np.ndarray = field(default_factory=lambda: _EMPTY_I64)  # cluster indices
    refcount_block_sources: np.ndarray = field(default_factory=lambda: _EMPTY_I64)
    past_eof_clusters: np.ndarray = field(default_factory=lambda: _EMPTY_I64)
    past_eof_refcounts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    past_eof_total: int = 0  # all of them; the arrays keep the first PAST_EOF_KEPT
    defects: list[Defect] = field(default_factory=list)
    complete: bool = True
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

    def file_reference_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(image, bitmap)`` reference counts of every cluster that starts inside the file."""
        n = self.file_clusters
        inside = (self.clusters >= 0) & (self.clusters < n)
        image = np.bincount(self.clusters[inside], weights=self.weights[inside], minlength=n)
        bm = self.bm_clusters[(self.bm_clusters >= 0) & (self.bm_clusters < n)]
        return image[:n].astype(np.int64), np.bincount(bm, minlength=n)[:n].astype(np.int64)

    def stored_refcounts(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(refcounts, inside)`` of *clusters* as the image stores them (0 where no refcount
        block covers a cluster, ``inside`` False there), or None if they could not be read."""
        if self.refcounts is None:
            return None
        return ent.stored_refcounts_of(self.refcounts, clusters)

    def referenced_clusters(self) -> np.ndarray:
        """Every cluster anything references, sorted, once each."""
        return unique_sorted(np.concatenate((self.clusters, self.bm_clusters)))

    def image_kinds_at(self, cluster: int) -> list[Kind]:
        lo = int(np.searchsorted(self.clusters, cluster, side="left"))
        hi = int(np.searchsorted(self.clusters, cluster, side="right"))
        return sorted({Kind(int(k)) for k in self.kinds[lo:hi]})

    def bitmap_refs_at(self, cluster: int) -> list[BitmapRef]:
        hits = np.flatnonzero(self.bm_clusters == cluster)
        return [self.bitmap_ref(int(i)) for i in hits]

    def bitmap_ref(self, i: int) -> BitmapRef:
        """The *i*-th bitmap reference."""
        return BitmapRef(
            int(self.bm_clusters[i]),
            Kind(int(self.bm_kinds[i])),
            int(self.bm_index[i]),
            int(self.bm_source[i]),
        )

    def bitmap_clusters(self, index: int) -> np.ndarray:
        """Distinct clusters referenced by bitmap *index* (table and data; -1: the directory)."""
        return unique_sorted(self.bm_clusters[self.bm_index == index])


# -- the walk ------------------------------------------------------------------------------


class _Refs:
    """Accumulates (cluster, kind, weight) triples in chunks."""

    def __init__(self) -> None:
        self.clusters: list[np.ndarray] = []
        self.kinds: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []

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

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.clusters:
            return _EMPTY_I64, np.zeros(0, np.uint8), _EMPTY_I64
        return (
            np.concatenate(self.clusters),
            np.concatenate(self.kinds),
            np.concatenate(self.weights),
        )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class _Walker:
    def __init__(self, image: Image, *, workers: int, scan_window: int) -> None:
        self.image = image
        self.workers = workers
        self.scan_window = scan_window
        self.cs = image.cluster_size
        self.cb = image.cluster_bits
        self.file_size = image.file_size
        self.file_clusters = -(-image.file_size // self.cs)
        self.refs = _Refs()
        self.defects = _Defects()
        self.complete = True
        header = image.header
        incompat = header.incompatible if header.version >= 3 else IncompatibleFeature(0)
        self.extended_l2 = bool(incompat & IncompatibleFeature.EXTENDED_L2)
        self.external_data = bool(incompat & IncompatibleFeature.EXTERNAL_DATA_FILE)
        self.entry_bytes = 16 if self.extended_l2 else 8
        self.l2_entries = self.cs // self.entry_bytes
        # L2 table offset -> [weight, active] (weight: L1 entries pointing at it).
        self.l2_refs: dict[int, list[int]] = {}
        self.active_l1: list[tuple[int, int, bool]] = []  # (entry offset, l2 offset, copied)
        self.l1_bytes_read = 0
        self.refcounts: np.ndarray | None = None
        self.max_refcount = (1 << (1 << min(6, header.effective_refcount_order))) - 1
        self.block_clusters = _EMPTY_I64
        self.block_sources = _EMPTY_I64
        self.past_eof_clusters = _EMPTY_I64
        self.past_eof_refcounts = np.zeros(0, np.uint64)
        self.past_eof_total = 0

    def problem(
        self, kind: DefectKind, cls: str, reason: str, offset: int | None, fld: str, n: int = 1
    ) -> None:
        self.defects.add(kind, cls, reason, offset, fld, n)

    def incomplete(
        self, kind: DefectKind, cls: str, reason: str, offset: int | None, fld: str
    ) -> None:
        self.problem(kind, cls, reason, offset, fld)
        self.complete = False

    def inside(self, offset: int, length: int) -> bool:
        return offset >= 0 and length >= 0 and offset + length <= self.file_size

    def past_eof(self, offset: int, length: int) -> bool:
        """QEMU's rule (qcow2_inc_refcounts_imrt): a region may end less than a cluster past EOF."""
        return offset + length - self.file_size >= self.cs

    def add_range(self, offset: int, length: int, kind: Kind) -> None:
        if length <= 0:
            return
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        self.refs.add(np.arange(first, last + 1, dtype=np.int64), kind)

    # -- refcount structure ----------------------------------------------------------

    def refcount_table_location(self) -> bool:
        """QEMU's rules for the refcount table's order, size and place (False: a defect)."""
        header, cs = self.image.header, self.cs
        order = header.effective_refcount_order
        off, nclus = header.refcount_table_offset, header.refcount_table_clusters
        reason = None
        if order > 6:
            reason = f"refcount_order is {order}, the largest allowed is 6"
            where, fld = H.refcount_order, "refcount_order"
        elif nclus == 0:
            reason = "refcount_table_clusters is 0"
            where, fld = H.refcount_table_clusters, "refcount_table_clusters"
        elif nclus * cs > QCOW_MAX_REFTABLE_SIZE:
            reason = f"the refcount table of {nclus} clusters exceeds QEMU's limit of 8 MiB"
            where, fld = H.refcount_table_clusters, "refcount_table_clusters"
        elif off % cs or off == 0:
            reason = (
                f"refcount_table_offset {off:#x} is not a non-zero multiple of the cluster size"
            )
            where, fld = H.refcount_table_offset, "refcount_table_offset"
        elif not self.inside(off, nclus * cs):
            reason = (
                f"the refcount table ({nclus} clusters at {off:#x}) extends past the end of "
                "the file"
            )
            where, fld = H.refcount_table_offset, "refcount_table_offset"
        if reason is not None:
            self.incomplete(DefectKind.REFCOUNT_TABLE, "location", reason, where, fld)
            return False
        return True

    def refcount_structure(self) -> None:
        """Add the refcount table and blocks; read the refcounts of the file's clusters."""
        if not self.refcount_table_location():
            return
        image, header, cs = self.image, self.image.header, self.cs
        order = header.effective_refcount_order
        off, nclus = header.refcount_table_offset, header.refcount_table_clusters
        self.add_range(off, nclus * cs, Kind.REFCOUNT_TABLE)
        table = ent.be64(image.read(off, nclus * cs, what="refcount table"))
        epb = cs * 8 >> order
        blocks_needed = -(-self.file_clusters // epb)
        nz = np.flatnonzero(table)
        words = table[nz]
        offsets = words & ent.REFT_OFFSET
        for cls, bad, why in (
            ("reserved", (words & ent.REFT_RESERVED) != 0, "has reserved bits set"),
            ("unaligned", (offsets % np.uint64(cs)) != 0, "points at an unaligned refcount block"),
            (
                "outside",
                (offsets >> np.uint64(self.cb)) >= np.uint64(self.file_clusters),
                "points at a refcount block outside the file",
            ),
        ):
            hits = np.flatnonzero(bad)
            if len(hits):
                i = int(nz[hits[0]])
                self.problem(
                    DefectKind.REFCOUNT_TABLE_ENTRY,
                    cls,
                    f"refcount table entry {i} is {int(table[i]):#x}: it {why}",
                    off + 8 * i,
                    "refcount table entry",
                    len(hits),
                )
        good = (
            ((words & ent.REFT_RESERVED) == 0)
            & ((offsets % np.uint64(cs)) == 0)
            & ((offsets >> np.uint64(self.cb)) < np.uint64(self.file_clusters))
        )
        index = nz[good]
        block_offsets = offsets[good].astype(np.int64)
        self.block_clusters = block_offsets >> self.cb
        self.block_sources = off + 8 * index.astype(np.int64)
        self.refs.add(self.block_clusters, Kind.REFCOUNT_BLOCK)
        dtype = {0: np.uint8, 1: np.uint8, 2: np.uint8, 3: np.uint8, 4: np.uint16, 5: np.uint32}
        counts = np.zeros(blocks_needed * epb, dtype=dtype.get(order, np.uint64))
        wanted = index < blocks_needed
        for t, block in self._read_clusters(index[wanted], block_offsets[wanted]):
            counts[t * epb : (t + 1) * epb] = ent.decode_refcount_block(block, order)
        self.refcounts = counts[: self.file_clusters]
        self._refcounts_past_eof(
            counts[self.file_clusters :], index[~wanted], block_offsets[~wanted]
        )

    def _refcounts_past_eof(
        self, tail: np.ndarray, index: np.ndarray, block_offsets: np.ndarray
    ) -> None:
        """The non-zero refcounts of clusters past the end of the file: in *tail* (the rest of
        the last block the file needs) and in the blocks linked after it (*index*, at
        *block_offsets*).

        Bounded whatever the table says: each block in the file is read once however many
        entries link it, and at most :data:`PAST_EOF_KEPT` refcounts are kept
        (``past_eof_total`` counts them all).
        """
        order = self.image.header.effective_refcount_order
        epb = self.cs * 8 >> order
        found_c: list[np.ndarray] = []
        found_v: list[np.ndarray] = []
        kept = total = 0

        def take(values: np.ndarray, first_cluster: int) -> None:
            nonlocal kept, total
            used = np.flatnonzero(values)
            total += len(used)
            room = PAST_EOF_KEPT - kept
            if room > 0 and len(used):
                used = used[:room]
                found_c.append(used.astype(np.int64) + first_cluster)
                found_v.append(values[used].astype(np.uint64))
                kept += len(used)

        take(tail, self.file_clusters)
        _, first = np.unique(block_offsets, return_index=True)
        once = np.sort(first)
        for t, block in self._read_clusters(index[once], block_offsets[once]):
            take(ent.decode_refcount_block(block, order), t * epb)
        if found_c:
            self.past_eof_clusters = np.concatenate(found_c)
            self.past_eof_refcounts = np.concatenate(found_v)
        self.past_eof_total = total

    def _read_clusters(self, keys: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[int, bytes]]:
        """Yield (key, cluster bytes) for clusters at *offsets*, reading contiguous runs at once.

        The last cluster of the file may be partly past its end: what is missing reads as zeros.
        """
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
            data = self.image.pread(start, (j - i) * cs).ljust((j - i) * cs, b"\0")
            for k in range(i, j):
                rel = int(offsets[k]) - start
                yield int(keys[k]), data[rel : rel + cs]
            i = j

    def refcount_of(self, clusters: np.ndarray) -> np.ndarray | None:
        """Stored refcounts of *clusters* (int64; 0 past the file), or None if unreadable."""
        if self.refcounts is None:
            return None
        return ent.stored_refcounts_of(self.refcounts, clusters)[0]

    # -- L1 tables ------------------------------------------------------------------

    def l1_too_small(self) -> None:
        """QEMU's 'L1 table is too small': l1_size below what the disk size needs."""
        header = self.image.header
        needed = -(-header.size // (self.cs * self.l2_entries)) if header.size else 0
        if header.l1_size < needed:
            self.problem(
                DefectKind.L1_TABLE,
                "too-small",
                f"l1_size is {header.l1_size}, a disk of {header.size} bytes needs at least "
                f"{needed} entries (QEMU: 'L1 table is too small')",
                H.l1_size,
                "l1_size",
            )

    def l1_table_location(
        self, offset: int, size: int, *, active: bool, where: int, label: str
    ) -> bool:
        """QEMU's rules for an L1 table's size and place; False (and a defect) if broken."""
        cs = self.cs
        nbytes = size * 8
        kind = DefectKind.L1_TABLE if active else DefectKind.SNAPSHOT_TABLE
        reason = None
        if nbytes > QCOW_MAX_L1_SIZE:
            reason = (
                f"{label} has {size} entries, more than QEMU's limit of {QCOW_MAX_L1_SIZE // 8}"
            )
        elif offset % cs or offset == 0:
            reason = f"{label} offset {offset:#x} is not a non-zero multiple of the cluster size"
        elif not self.inside(offset, nbytes):
            reason = f"{label} ({nbytes} bytes at {offset:#x}) extends past the end of the file"
        elif not active and self.l1_bytes_read + nbytes > self.file_size:
            reason = f"{label} would take the snapshots' L1 tables past the size of the file"
        if reason is not None:
            self.incomplete(kind, "location", reason, where, "l1_table_offset")
            return False
        self.l1_bytes_read += nbytes
        return True

    def l1_table(self, offset: int, size: int, *, active: bool, where: int, label: str) -> None:
        cs = self.cs
        nbytes = size * 8
        if size == 0:
            return
        if not self.l1_table_location(offset, size, active=active, where=where, label=label):
            return
        self.add_range(offset, nbytes, Kind.L1 if active else Kind.SNAPSHOT_L1)
        l1 = ent.be64(self.image.read(offset, nbytes, what=label))
        nz = np.flatnonzero(l1)
        words = l1[nz]
        l2_offsets = (words & ent.L1E_OFFSET).astype(np.int64)
        checks = (
            ("reserved", (words & ent.L1E_RESERVED) != 0, "has reserved bits set"),
            ("no-offset", l2_offsets == 0, "has flags set but no L2 table offset"),
            ("unaligned", (l2_offsets % cs) != 0, "points at an unaligned L2 table"),
            (
                "outside",
                (l2_offsets != 0) & (l2_offsets >= self.file_size),
                "points at an L2 table past the end of the file",
            ),
        )
        usable = np.ones(len(words), dtype=bool)
        for cls, bad, why in checks:
            hits = np.flatnonzero(bad)
            if not len(hits):
                continue
            if cls != "reserved":
                usable &= ~bad
            i = int(nz[hits[0]])
            self.problem(
                DefectKind.L1_ENTRY,
                f"{cls}-{'active' if active else 'snapshot'}",
                f"entry {i} of {label} is {int(l1[i]):#x}: it {why}",
                offset + 8 * i,
                "L1 entry",
                len(hits),
            )
            if cls in ("unaligned", "outside"):
                self.complete = False
        for i, off, copied in zip(
            nz[usable].tolist(),
            l2_offsets[usable].tolist(),
            ((words[usable] & ent.COPIED) != 0).tolist(),
            strict=True,
        ):
            slot = self.l2_refs.setdefault(off, [0, 0])
            slot[0] += 1
            if active:
                slot[1] = 1
                self.active_l1.append((offset + 8 * i, off, copied))

    def active_l1_copied(self) -> None:
        """OFLAG_COPIED of active L1 entries against the refcount of their L2 table."""
        if not self.active_l1 or self.refcounts is None:
            return
        where = np.array([a for a, _o, _c in self.active_l1], dtype=np.int64)
        clusters = np.array([o >> self.cb for _a, o, _c in self.active_l1], dtype=np.int64)
        copied = np.array([c for _a, _o, c in self.active_l1], dtype=bool)
        rc = self.refcount_of(clusters)
        assert rc is not None
        bad = np.flatnonzero((rc == 1) != copied)
        if len(bad):
            i = int(bad[0])
            self.problem(
                DefectKind.COPIED_FLAG,
                "l1",
                f"the active L1 entry at {int(where[i]):#x} has OFLAG_COPIED "
                f"{'set' if copied[i] else 'clear'} but its L2 table's refcount is {int(rc[i])}",
                int(where[i]),
                "L1 entry",
                len(bad),
            )

    # -- L2 tables and guest data ------------------------------------------------------

    def _windows(self, offsets: np.ndarray) -> list[tuple[int, int, int]]:
        """For sorted L2 table *offsets* (inside the file): ``(first table, start, length)``.

        Tables ``offsets[i:i + length // cluster_size]`` lie contiguously in the
        file at ``start``; a window is at most :data:`SCAN_WINDOW` bytes (or one
        cluster).  The last cluster of the file may be partly past its end.
        """
        cs = self.cs
        n = len(offsets)
        if not n:
            return []
        per = max(1, self.scan_window // cs)
        breaks = np.flatnonzero(np.diff(offsets) != cs) + 1
        bounds = [0, *breaks.tolist(), n]
        out = []
        for r in range(len(bounds) - 1):
            for i in range(bounds[r], bounds[r + 1], per):
                j = min(bounds[r + 1], i + per)
                out.append((i, int(offsets[i]), (j - i) * cs))
        return out

    def _nonzero_entries(
        self, offsets: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(first table, entry positions, first words, second words)`` of non-zero entries.

        Most L2 entries are zero: one vectorised comparison finds the others,
        and only those are byte-swapped.  Windows are read (``pread`` into a
        buffer each worker reuses) and searched by :func:`ordered_map`, and
        come back in file order.
        """
        windows = self._windows(offsets)
        step = 2 if self.extended_l2 else 1
        image = self.image

        def scan(k: int, buf: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
            i, start, length = windows[k]
            view = memoryview(buf)[:length]
            got = image.read_into(start, view)
            if got < length:
                view[got:] = bytes(length - got)  # the file's last cluster, partly past EOF
            words = buf[:length].view(np.uint64)
            if step == 1:
                hits = np.flatnonzero(words)
                return i, hits, words[hits].byteswap(), None
            pairs = words.reshape(-1, 2)
            hits = np.flatnonzero(pairs[:, 0] | pairs[:, 1])
            return i, hits, pairs[hits, 0].byteswap(), pairs[hits, 1].byteswap()

        lengths = [length for *_rest, length in windows]
        biggest = max(lengths, default=0)
        workers = self.workers if sum(lengths) >= PARALLEL_SCAN_BYTES else 1
        yield from ordered_map(
            scan, len(windows), lambda: np.empty(biggest, np.uint8), workers=workers
        )

    def l2_tables(self) -> None:
        if not self.l2_refs:
            return
        items = sorted(self.l2_refs.items())
        offsets = np.array([o for o, _s in items], dtype=np.int64)
        weights = np.array([s[0] for _o, s in items], dtype=np.int64)
        active = np.array([bool(s[1]) for _o, s in items], dtype=bool)
        self.refs.add(offsets >> self.cb, Kind.L2, weights)
        per_table = self.l2_entries
        for i, hits, words, second in self._nonzero_entries(offsets):
            if not len(hits):
                continue
            table = i + hits // per_table
            where = offsets[table] + (hits % per_table) * self.entry_bytes
            self._l2_entries(words, second, where, weights[table], active[table])

    def _l2_entries(
        self,
        words: np.ndarray,
        second: np.ndarray | None,
        where: np.ndarray,
        weight: np.ndarray,
        active: np.ndarray,
    ) -> None:
        """Check and count one window's non-zero L2 entries (qemu-img check's rules)."""
        cs = self.cs
        types = ent.cluster_types(
            words, extended=self.extended_l2, external_data=self.external_data
        )
        compressed = types == ClusterType.COMPRESSED
        allocated = (types == ClusterType.NORMAL) | (types == ClusterType.ZERO_ALLOC)
        host = (words & ent.L2E_OFFSET).astype(np.int64)
        checks: list[tuple[str, np.ndarray, str]] = [
            (
                "reserved",
                ~compressed & ((words & ent.L2E_STD_RESERVED) != 0),
                "has reserved bits set",
            ),
            (
                "compressed-copied",
                compressed & ((words & ent.COPIED) != 0),
                "is compressed and has OFLAG_COPIED set",
            ),
            (
                "unaligned",
                allocated & (host % cs != 0),
                "points at a data cluster that is not cluster aligned",
            ),
        ]
        if self.external_data:
            checks.append(
                (
                    "compressed-data-file",
                    compressed,
                    "is compressed in an image with an external data file",
                )
            )
        if second is not None:
            alloc_bits = second & ent.SUBCLUSTER_ALLOC
            checks += [
                (
                    "compressed-subclusters",
                    compressed & (second != 0),
                    "is compressed and has subcluster bits set",
                ),
                (
                    "subclusters-both",
                    allocated & (((second >> np.uint64(32)) & alloc_bits) != 0),
                    "marks subclusters both allocated and zero",
                ),
                (
                    "unallocated-subclusters",
                    (types == ClusterType.UNALLOCATED) & (alloc_bits != 0),
                    "has no data cluster but marks subclusters allocated",
                ),
            ]
        for cls, bad, why in checks:
            hits = np.flatnonzero(bad)
            if len(hits):
                k = int(hits[0])
                self.problem(
                    DefectKind.L2_ENTRY,
                    cls,
                    f"the L2 entry at {int(where[k]):#x} ({int(words[k]):#x}) {why}",
                    int(where[k]),
                    "L2 entry",
                    len(hits),
                )
        if self.external_data:
            # Data clusters live in the data file: not refcounted here, COPIED always expected.
            self._data_copied(words[allocated], where[allocated], active[allocated], None)
            return
        self._data_refs(
            host[allocated],
            where[allocated],
            weight[allocated],
            words[allocated],
            active[allocated],
        )
        usable = compressed if second is None else compressed & (second == 0)
        self._compressed_refs(words[usable], where[usable], weight[usable])

    def _data_refs(
        self,
        host: np.ndarray,
        where: np.ndarray,
        weight: np.ndarray,
        words: np.ndarray,
        active: np.ndarray,
    ) -> None:
        if not len(host):
            return
        cb = self.cb
        past = host >= self.file_size
        hits = np.flatnonzero(past)
        if len(hits):
            k = int(hits[0])
            self.problem(
                DefectKind.PAST_EOF,
                "data",
                f"the L2 entry at {int(where[k]):#x} points at a data cluster at {int(host[k]):#x}, "
                f"past the end of the file ({self.file_size} bytes)",
                int(where[k]),
                "L2 entry",
                len(hits),
            )
        ok = ~past
        first = host[ok] >> cb
        last = (host[ok] + self.cs - 1) >> cb  # an unaligned entry touches two clusters, as in QEMU
        self.refs.add(first, Kind.DATA, weight[ok])
        two = last != first
        if two.any():
            self.refs.add(last[two], Kind.DATA, weight[ok][two])
        self._data_copied(words[ok], where[ok], active[ok], first)

    def _data_copied(
        self, words: np.ndarray, where: np.ndarray, active: np.ndarray, clusters: np.ndarray | None
    ) -> None:
        """OFLAG_COPIED of active L2 entries against the refcount of their data cluster."""
        if not active.any():
            return
        words, where = words[active], where[active]
        copied = (words & ent.COPIED) != 0
        if clusters is None:  # external data file: clusters are not refcounted, COPIED is expected
            rc = np.ones(len(words), dtype=np.int64)
        else:
            found = self.refcount_of(clusters[active])
            if found is None:
                return
            rc = found
        bad = np.flatnonzero((rc == 1) != copied)
        if len(bad):
            k = int(bad[0])
            self.problem(
                DefectKind.COPIED_FLAG,
                "l2",
                f"the L2 entry at {int(where[k]):#x} has OFLAG_COPIED "
                f"{'set' if copied[k] else 'clear'} but its data cluster's refcount is {int(rc[k])}",
                int(where[k]),
                "L2 entry",
                len(bad),
            )

    def _compressed_refs(self, words: np.ndarray, where: np.ndarray, weight: np.ndarray) -> None:
        if not len(words):
            return
        cb = self.cb
        coffset, csize = ent.compressed_ranges(words, cb)
        past = coffset + csize - self.file_size >= self.cs
        hits = np.flatnonzero(past)
        if len(hits):
            k = int(hits[0])
            self.problem(
                DefectKind.PAST_EOF,
                "compressed",
                f"the compressed L2 entry at {int(where[k]):#x} points at {int(csize[k])} bytes "
                f"at {int(coffset[k]):#x}, past the end of the file ({self.file_size} bytes)",
                int(where[k]),
                "L2 entry",
                len(hits),
            )
        ok = ~past
        first = coffset[ok] >> cb
        span = ((coffset[ok] + csize[ok] - 1) >> cb) - first + 1
        w = weight[ok]
        for k in range(int(span.max(initial=0))):
            sel = span > k
            self.refs.add(first[sel] + k, Kind.COMPRESSED, w[sel])

    # -- snapshots ----------------------------------------------------------------------

    def snapshots(self, *, walk_tables: bool = True) -> None:
        """The snapshot table and each snapshot's L1 table (only located unless *walk_tables*)."""
        header = self.image.header
        count, offset = header.nb_snapshots, header.snapshots_offset
        kind = DefectKind.SNAPSHOT_TABLE
        if offset % self.cs or offset + 40 * count > 0x7FFFFFFFFFFFFFFF:
            # QEMU validates the offset even when there are no snapshots.
            self.incomplete(
                kind,
                "offset",
                f"snapshots_offset {offset:#x} is not cluster aligned or too large (QEMU: "
                "'Snapshot table offset invalid')",
                H.snapshots_offset,
                "snapshots_offset",
            )
            return
        if count == 0:
            return
        if self.external_data:
            self.problem(
                kind,
                "data-file",
                f"the image has {_plural(count, 'internal snapshot')} and an external data file, "
                "which QEMU does not allow",
                H.nb_snapshots,
                "nb_snapshots",
            )
        if count > layout.QCOW_MAX_SNAPSHOTS:
            self.incomplete(
                kind,
                "count",
                f"nb_snapshots is {count}, QEMU's limit is {layout.QCOW_MAX_SNAPSHOTS}",
                H.nb_snapshots,
                "nb_snapshots",
            )
            return
        if offset == 0 or offset >= self.file_size:
            self.incomplete(
                kind,
                "offset",
                f"snapshots_offset {offset:#x} is not a cluster-aligned offset inside the file",
                H.snapshots_offset,
                "snapshots_offset",
            )
            return
        limit = min(layout.QCOW_MAX_SNAPSHOTS_SIZE, self.file_size - offset)
        buf = b""
        pos = 0
        l1s: list[tuple[int, int, int]] = []
        fixed_size = layout.SNAPSHOT_ENTRY_FIXED_SIZE
        for n in range(count):
            need = pos + fixed_size
            if need > len(buf):
                buf = self._grow(offset, buf, need, limit)
            if need > len(buf):
                self._snapshot_cut(n, offset + pos)
                return
            entry = layout.SnapshotEntryFixed.parse(buf[pos : pos + fixed_size])
            if entry.extra_data_size > layout.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                self.incomplete(
                    kind,
                    "extra-data",
                    f"snapshot table entry {n} has {entry.extra_data_size} bytes of extra data, "
                    f"QEMU allows {layout.QCOW_MAX_SNAPSHOT_EXTRA_DATA} (QEMU: 'Too much extra "
                    "metadata')",
                    offset + pos + layout.SNAPSHOT_FIELD.extra_data_size,
                    "extra_data_size",
                )
                return
            # qemu-img check's rule, not one of the open: QEMU opens such an image
            if (
                walk_tables
                and header.version >= 3
                and entry.extra_data_size < layout.SNAPSHOT_EXTRA_DATA_V3_MIN
            ):
                self.problem(
                    kind,
                    "extra-data-short",
                    f"snapshot table entry {n} has {entry.extra_data_size} bytes of extra data, a "
                    f"version 3 image needs at least {layout.SNAPSHOT_EXTRA_DATA_V3_MIN} (QEMU: "
                    f"'snapshot table entry {n} is incomplete')",
                    offset + pos + layout.SNAPSHOT_FIELD.extra_data_size,
                    "extra_data_size",
                )
            full = pos + layout.snapshot_entry_size(
                entry.extra_data_size, entry.id_str_size, entry.name_size
            )
            if full > len(buf):
                buf = self._grow(offset, buf, full, limit)
            if full > len(buf):
                self._snapshot_cut(n, offset + pos)
                return
            l1s.append((entry.l1_table_offset, entry.l1_size, offset + pos))
            pos = full
        self.add_range(offset, pos, Kind.SNAPSHOT_TABLE)
        for n, (l1_off, l1_size, where) in enumerate(l1s):
            label = f"the L1 table of snapshot {n}"
            if walk_tables:
                self.l1_table(l1_off, l1_size, active=False, where=where, label=label)
            elif l1_size:
                self.l1_table_location(l1_off, l1_size, active=False, where=where, label=label)

    def _grow(self, offset: int, buf: bytes, need: int, limit: int) -> bytes:
        if need > limit:
            return buf
        want = min(limit, max(need, 2 * len(buf), 65536))
        return self.image.read(offset, want, what="snapshot table")

    def _snapshot_cut(self, n: int, where: int) -> None:
        self.incomplete(
            DefectKind.SNAPSHOT_TABLE,
            "cut",
            f"snapshot table entry {n} runs past the end of the file or QEMU's 64 MiB limit",
            where,
            "snapshot table",
        )

    # -- encryption ------------------------------------------------------------------------

    def crypto(self) -> None:
        image = self.image
        ext = image.extension(layout.EXT_CRYPTO)
        method = image.header.crypt_method
        kind = DefectKind.CRYPTO_HEADER
        if ext is None:
            if method == 2:
                self.problem(
                    kind,
                    "missing",
                    "the image uses LUKS encryption but has no encryption header pointer extension",
                    H.crypt_method,
                    "crypt_method",
                )
            return
        if len(ext.data) != layout.CRYPTO_HEADER_POINTER_SIZE:
            self.problem(
                kind,
                "length",
                f"the encryption header pointer extension has length {len(ext.data)}, it must "
                f"be {layout.CRYPTO_HEADER_POINTER_SIZE}",
                ext.offset + layout.EXTENSION_FIELD.length,
                "length",
            )
            return
        off, length = crypto_header_pointer(ext.data)
        if method != 2:
            self.problem(
                kind,
                "method",
                f"an encryption header pointer is present but crypt_method is {method}, not 2 "
                "(LUKS)",
                H.crypt_method,
                "crypt_method",
            )
        if off % self.cs or not self.inside(off, length):
            self.incomplete(
                kind,
                "location",
                f"the encryption header ({length} bytes at {off:#x}) is unaligned or outside the "
                "file",
                ext.data_offset,
                "crypto header offset",
            )
            return
        self.add_range(off, -(-length // self.cs) * self.cs, Kind.CRYPTO_HEADER)


def bitmap_references(
    image: Image, bitmaps: BitmapStructures | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(clusters, kinds, bitmap index, source offset)`` of the bitmap structures' references.

    Only references QEMU's check counts: the directory's clusters, each table's
    clusters (an aligned, non-empty table inside the file) and each data
    cluster of a valid table entry (``valid_data_entries``).
    """
    cb, cs = image.cluster_bits, image.cluster_size
    parts: list[tuple[np.ndarray, int, int, np.ndarray | int]] = []
    if bitmaps is not None:
        off, size = bitmaps.directory_offset, bitmaps.directory_size
        if size > 0:
            clusters = np.arange(off >> cb, ((off + size - 1) >> cb) + 1, dtype=np.int64)
            parts.append((clusters, Kind.BITMAP_DIRECTORY, -1, bitmaps.directory_source))
        for entry in bitmaps.entries:
            off, n = entry.bitmap_table_offset, entry.bitmap_table_size
            if off == 0 or off % cs or n == 0 or n * 8 > image.file_size:
                continue
            clusters = np.arange(off >> cb, ((off + n * 8 - 1) >> cb) + 1, dtype=np.int64)
            parts.append((clusters, Kind.BITMAP_TABLE, entry.index, entry.offset))
            table = bitmaps.tables.get(entry.index)
            if table is None:
                continue
            idx, offsets = valid_data_entries(table, cs)
            parts.append(
                (
                    (offsets >> np.uint64(cb)).astype(np.int64),
                    Kind.BITMAP_DATA,
                    entry.index,
                    off + 8 * idx.astype(np.int64),
                )
            )
    if not parts:
        return _EMPTY_I64, np.zeros(0, np.uint8), np.zeros(0, np.int32), _EMPTY_I64
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([np.full(len(p[0]), int(p[1]), np.uint8) for p in parts]),
        np.concatenate([np.full(len(p[0]), p[2], np.int32) for p in parts]),
        np.concatenate(
            [np.full(len(p[0]), p[3], np.int64) if isinstance(p[3], int) else p[3] for p in parts]
        ),
    )


def walk(
    image: Image,
    bitmaps: BitmapStructures | None = None,
    *,
    workers: int = WORKERS,
    scan_window: int = SCAN_WINDOW,
) -> ReferenceMap:
    """Every reference in *image* (and in *bitmaps*), with the stored refcounts and defects.

    Never raises for corruption: structures that cannot be walked are left
    out and described in ``defects`` (``complete`` is then False).  L2 tables
    are read *scan_window* bytes at a time by *workers* threads (when there
    is at least :data:`PARALLEL_SCAN_BYTES` of them); the map does not
    depend on either.
    """
    w = _Walker(image, workers=workers, scan_window=scan_window)
    header = image.header
    w.add_range(0, w.cs, Kind.HEADER)
    w.refcount_structure()
    w.l1_too_small()
    w.l1_table(
        header.l1_table_offset,
        header.l1_size,
        active=True,
        where=H.l1_table_offset,
        label="the active L1 table",
    )
    w.snapshots()
    w.l2_tables()
    w.active_l1_copied()
    w.crypto()
    clusters, kinds, weights = w.refs.arrays()
    order = np.argsort(clusters, kind="stable")
    bm = bitmap_references(image, bitmaps)
    return ReferenceMap(
        cluster_size=w.cs,
        cluster_bits=w.cb,
        file_clusters=w.file_clusters,
        max_refcount=w.max_refcount,
        clusters=clusters[order],
        kinds=kinds[order],
        weights=weights[order],
        bm_clusters=bm[0],
        bm_kinds=bm[1],
        bm_index=bm[2],
        bm_source=bm[3],
        refcounts=w.refcounts,
        refcount_blocks=w.block_clusters,
        refcount_block_sources=w.block_sources,
        past_eof_clusters=w.past_eof_clusters,
        past_eof_refcounts=w.past_eof_refcounts,
        past_eof_total=w.past_eof_total,
        defects=w.defects.list(),
        complete=w.complete,
    )


def open_defects(image: Image) -> list[Defect]:
    """The defects of *image* QEMU notices when it opens it, without walking a table.

    Where the refcount table, the active L1 table (and whether it is large
    enough), the snapshot table with each snapshot's L1 table, and the
    encryption header are, and their sizes -- the rules ``qcow2_do_open``
    applies -- with the same wording as :func:`walk`.  Entries of the L1, L2
    and refcount tables, and refcounts against references, are left to
    :func:`walk`: QEMU reads them only when the guest touches them.
    """
    w = _Walker(image, workers=1, scan_window=SCAN_WINDOW)
    header = image.header
    w.refcount_table_location()
    w.l1_too_small()
    if header.l1_size:
        w.l1_table_location(
            header.l1_table_offset,
            header.l1_size,
            active=True,
            where=H.l1_table_offset,
            label="the active L1 table",
        )
    w.snapshots(walk_tables=False)
    w.crypto()
    return w.defects.list()


def reference_map(image: Image, *, honored_only: bool = True) -> ReferenceMap:
    """Every reference in *image*, bitmaps included when QEMU would load them.

    With ``honored_only=False`` the bitmaps of an extension QEMU ignores
    (autoclear bit 0 clear) are counted too: what a writer must not hand out
    while they could still be brought back.  Never raises for corruption.
    """
    return walk(image, image.bitmap_structures(honored_only=honored_only))
