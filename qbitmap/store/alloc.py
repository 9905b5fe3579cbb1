"""Cluster allocation over a qcow2 image's refcount structure.

Follows QEMU's method (block/qcow2-refcount.c ``alloc_clusters_noref``,
``update_refcount``, ``alloc_refcount_block``, ``qcow2_refcount_area``;
docs/interop/qcow2.rst "Host cluster management") with the same
crash-safety invariant: **a cluster is never referenced while its refcount
is 0**.  A crash at any instant can leave clusters whose refcount is higher
than their number of references (leaks, which ``qemu-img check`` reports and
``-r leaks`` frees) and nothing worse.

* :meth:`Allocator.allocate` finds ``count`` consecutive clusters whose
  refcount is 0 (clusters under a missing refcount block, past the table's
  coverage or past the end of the file count as free) and sets their
  refcounts to 1.  The refcount entries are written at once; the caller
  flushes before anything references the clusters.
* Missing refcount blocks are placed right after the run they are needed
  for (never inside it: a run can be longer than one block's range).  A
  block that lies in its own range records its own refcount 1
  (self-describing); otherwise the block covering it does.  New blocks are
  written and flushed before the 8-byte refcount table entries that link
  them, each flushed, in an order where the block counting another is
  linked first.
* A refcount table that is too small is replaced: a new, larger table (with
  about 50 % headroom) and the refcount blocks its own area needs are
  written past every used cluster, their refcounts set, everything flushed;
  then the header is switched with one 12-byte write at offset 48
  (``refcount_table_offset``, ``refcount_table_clusters``), flushed; only
  then is the old table freed.
* :meth:`Allocator.free` decrements refcounts.  Call it only after the last
  reference to the clusters is gone *and flushed*.

Refcount widths of 1 to 64 bits (``refcount_order`` 0..6) are supported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from qbitmap.errors import AllocationError, ImageFormatError, UnsupportedImageError
from qbitmap.format import layout
from qbitmap.format.entries import be64, decode_refcount_block, set_refcount_in_block, to_be64
from qbitmap.format.layout import QCOW_MAX_REFTABLE_SIZE
from qbitmap.store.disk import Disk

# Host offsets must stay below 2^56 (QCOW_MAX_CLUSTER_OFFSET).
MAX_HOST_OFFSET = 1 << 56


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of whole clusters: file ``offset`` (bytes), ``count`` clusters."""

    offset: int
    count: int


class Allocator:
    """Allocates and frees clusters of one image, writing refcounts through *disk*.

    Args:
        disk: the image's Disk (its caller holds the image lock).
        cluster_bits: ``cluster_bits`` from the header.
        refcount_order: ``refcount_order`` (4 for v2 images).
        refcount_table_offset: from the header.
        refcount_table_clusters: from the header.

    After a table growth the header fields at 48..59 have been rewritten;
    read :attr:`refcount_table_offset` and :attr:`refcount_table_clusters`
    when building a new header.
    """

    def __init__(
        self,
        disk: Disk,
        *,
        cluster_bits: int,
        refcount_order: int,
        refcount_table_offset: int,
        refcount_table_clusters: int,
    ) -> None:
        if not 0 <= refcount_order <= 6:
            raise UnsupportedImageError(f"refcount_order {refcount_order} is outside 0..6")
        self.disk = disk
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_order = refcount_order
        self.entries_per_block = self.cluster_size * 8 >> refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        if refcount_table_offset % self.cluster_size:
            raise ImageFormatError(
                f"refcount_table_offset {refcount_table_offset:#x} is not cluster aligned",
                offset=layout.HEADER_FIELD.refcount_table_offset,
                field="refcount_table_offset",
            )
        if refcount_table_clusters * self.cluster_size > QCOW_MAX_REFTABLE_SIZE:
            raise ImageFormatError(
                f"refcount table of {refcount_table_clusters} clusters exceeds 8 MiB",
                offset=layout.HEADER_FIELD.refcount_table_clusters,
                field="refcount_table_clusters",
            )
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        raw = disk.pread(refcount_table_offset, refcount_table_clusters * self.cluster_size)
        if len(raw) != refcount_table_clusters * self.cluster_size:
            raise ImageFormatError(
                "refcount table extends past the end of the file",
                offset=refcount_table_offset,
                field="refcount_table_offset",
            )
        self.table = be64(raw)
        self._raw: dict[int, bytearray] = {}
        self._values: dict[int, np.ndarray] = {}
        self._dirty: dict[int, tuple[int, int]] = {}
        self.free_hint = 0
        #: Every extent this allocator handed out, in order (for reports and tests).
        self.allocated: list[Extent] = []
        #: Every extent freed, in order.
        self.freed: list[Extent] = []
        #: Refcount blocks created and table moves, for the plan/report.
        self.blocks_created: list[int] = []
        self.table_moves: list[tuple[int, int, int, int]] = []  # old off, old n, new off, new n
        self._avoid = np.zeros(0, dtype=np.int64)

    def avoid(self, clusters: np.ndarray) -> None:
        """Never hand out *clusters* (sorted cluster indices), whatever their refcount says.

        For clusters something still references although their refcount is 0:
        a damaged refcount must not turn into two owners of one cluster.
        """
        self._avoid = np.asarray(clusters, dtype=np.int64)

    def _first_avoided(self, start: int, count: int) -> int | None:
        """The first avoided cluster in ``[start, start + count)``, if any."""
        i = int(np.searchsorted(self._avoid, start))
        if i < len(self._avoid) and int(self._avoid[i]) < start + count:
            return int(self._avoid[i])
        return None

    # -- reading ---------------------------------------------------------------

    def block_offset(self, table_index: int) -> int:
        """File offset of refcount block *table_index*, 0 if missing or past the table."""
        if table_index >= len(self.table):
            return 0
        word = int(self.table[table_index])
        offset = word & layout.REFT_OFFSET_MASK
        if offset % self.cluster_size:
            raise ImageFormatError(
                f"refcount block offset {offset:#x} is not cluster aligned",
                offset=self.refcount_table_offset + 8 * table_index,
                field="refcount table entry",
            )
        return offset

    def _block(self, table_index: int) -> np.ndarray | None:
        if table_index in self._values:
            return self._values[table_index]
        offset = self.block_offset(table_index)
        if offset == 0:
            return None
        raw = self.disk.pread(offset, self.cluster_size)
        if len(raw) < self.cluster_size:
            # A refcount block (partly) past EOF reads as zeros.
            raw = raw + bytes(self.cluster_size - len(raw))
        self._raw[table_index] = bytearray(raw)
        values = decode_refcount_block(raw, self.refcount_order)
        self._values[table_index] = values
        return values

    def refcount(self, cluster_index: int) -> int:
        """Current refcount of host cluster *cluster_index* (0 if not covered)."""
        table_index, block_index = divmod(cluster_index, self.entries_per_block)
        block = self._block(table_index)
        return 0 if block is None else int(block[block_index])

    def refcounts(self, first_cluster: int, count: int) -> list[int]:
        return [self.refcount(first_cluster + i) for i in range(count)]

    def highest_used_cluster(self) -> int:
        """Index of the last cluster with a non-zero refcount (-1 if none)."""
        for table_index in range(len(self.table) - 1, -1, -1):
            block = self._block(table_index)
            if block is None:
                continue
            nz = np.flatnonzero(block)
            if len(nz):
                return table_index * self.entries_per_block + int(nz[-1])
        return -1

    def find_free(self, count: int, start: int | None = None) -> int:
        """First cluster index of *count* consecutive free clusters (refcount 0, not avoided)."""
        if count <= 0:
            raise ValueError("count must be positive")
        cluster = self.free_hint if start is None else start
        while True:
            found = self._find_refcount_zero(count, cluster)
            avoided = self._first_avoided(found, count)
            if avoided is None:
                return found
            cluster = avoided + 1

    def _find_refcount_zero(self, count: int, cluster: int) -> int:
        """First cluster index at or after *cluster* of *count* consecutive refcount-0 clusters."""
        epb = self.entries_per_block
        run_start: int | None = None
        while True:
            table_index, block_index = divmod(cluster, epb)
            block = self._block(table_index)
            block_end = (table_index + 1) * epb
            if block is None:
                if run_start is None:
                    run_start = cluster
                if block_end - run_start >= count:
                    return run_start
                cluster = block_end
                continue
            free = block[block_index:] == 0
            edges = np.diff(np.concatenate(([0], free.view(np.int8), [0])))
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                abs_start = cluster + s
                if s == 0 and run_start is not None:
                    abs_start = run_start
                if cluster + e - abs_start >= count:
                    return abs_start
            if len(ends) and ends[-1] == len(free):
                last_start = cluster + int(starts[-1])
                run_start = run_start if (starts[-1] == 0 and run_start is not None) else last_start
            else:
                run_start = None
            cluster = block_end

    # -- writing ---------------------------------------------------------------

    def _set(self, cluster_index: int, value: int) -> None:
        table_index, block_index = divmod(cluster_index, self.entries_per_block)
        block = self._block(table_index)
        if block is None:
            raise AssertionError(f"no refcount block covers cluster {cluster_index}")
        if not 0 <= value <= self.max_refcount:
            raise AllocationError(
                f"refcount of cluster {cluster_index} would become {value}, outside "
                f"0..{self.max_refcount} ({1 << self.refcount_order}-bit refcounts)"
            )
        set_refcount_in_block(self._raw[table_index], block_index, value, self.refcount_order)
        block[block_index] = value
        width = 1 << self.refcount_order
        lo = block_index * width // 8
        hi = ((block_index + 1) * width + 7) // 8
        old = self._dirty.get(table_index)
        self._dirty[table_index] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def _write_dirty(self) -> None:
        for table_index, (lo, hi) in sorted(self._dirty.items()):
            offset = self.block_offset(table_index)
            self.disk.pwrite(offset + lo, bytes(self._raw[table_index][lo:hi]))
        self._dirty.clear()

    def allocate(self, count: int = 1) -> int:
        """Allocate *count* consecutive clusters; return the file offset of the first.

        Their refcounts are 1 and written (not flushed) on return; refcount
        blocks and the table are created or grown (and flushed) as needed.
        The contents of the clusters are whatever the file held (zeros past
        EOF): write them before anything references them.
        """
        epb = self.entries_per_block
        need = count
        while True:
            start = self.find_free(need)
            if (start + need) * self.cluster_size > MAX_HOST_OFFSET:
                raise AllocationError("no free cluster below the 2^56 host offset limit")
            # Refcount blocks missing for the run and for the blocks themselves,
            # which go right after the run (never inside it: a run may be longer
            # than one block's range).
            nblocks = 0
            grown = False
            while True:
                end = start + count + nblocks
                last_t = (end - 1) // epb
                if last_t >= len(self.table):
                    self._grow_table(last_t)
                    grown = True
                    break
                missing = [t for t in range(start // epb, last_t + 1) if self.block_offset(t) == 0]
                if len(missing) == nblocks:
                    break
                nblocks = len(missing)
            if grown:
                need = count
                continue
            if nblocks:
                spot = start + count
                if self._first_avoided(spot, nblocks) is not None or any(
                    self.refcount(c) for c in range(spot, spot + nblocks)
                ):
                    need = count + nblocks  # look for room for the run and its blocks
                    continue
                self._create_blocks(dict(zip(missing, range(spot, spot + nblocks), strict=True)))
                need = count
                continue
            for cluster in range(start, start + count):
                self._set(cluster, self.refcount(cluster) + 1)
            self._write_dirty()
            self.free_hint = start + count
            extent = Extent(start * self.cluster_size, count)
            self.allocated.append(extent)
            return extent.offset

    def allocate_bytes(self, size: int) -> Extent:
        """Allocate enough consecutive clusters for *size* bytes (at least one)."""
        count = max(1, -(-size // self.cluster_size))
        return Extent(self.allocate(count), count)

    def free(self, offset: int, count: int = 1, *, references: int = 1) -> None:
        """Drop *references* references from each of *count* clusters starting at file *offset*.

        The caller must already have removed (and flushed) the references.
        Written, not flushed: one write per refcount block, whatever *references* is (a stray
        refcount may be 2^63).
        """
        if offset % self.cluster_size:
            raise ValueError(f"free of unaligned offset {offset:#x}")
        if references < 1:
            raise ValueError(f"free of {references} references")
        first = offset // self.cluster_size
        for cluster in range(first, first + count):
            current = self.refcount(cluster)
            if current < references:
                raise AllocationError(
                    f"cluster {cluster} (offset {cluster * self.cluster_size:#x}) has refcount "
                    f"{current}, fewer than the {references} references to drop"
                    + (": it is already free" if current == 0 else "")
                )
            self._set(cluster, current - references)
            if current == references:
                self.free_hint = min(self.free_hint, cluster)
        self._write_dirty()
        self.freed.append(Extent(offset, count))

    def free_extents(self, extents: Iterable[Extent]) -> None:
        for extent in extents:
            self.free(extent.offset, extent.count)

    # -- structure growth ------------------------------------------------------------

    def _create_blocks(self, placement: dict[int, int]) -> None:
        """Create the refcount blocks ``{table_index: cluster}`` and link them.

        Each new block counts the block clusters in its own range (a block in
        its own range describes itself); clusters in ranges of existing
        blocks are counted there.  All blocks are written and flushed while
        unreferenced (a crash leaks them at worst), then linked one 8-byte
        table entry at a time, each flushed, a block only after the block
        that counts it -- so no linked block ever has refcount 0.
        """
        cs = self.cluster_size
        epb = self.entries_per_block
        raws = {t: bytearray(cs) for t in placement}
        counter: dict[int, int] = {}
        for t, cluster in placement.items():
            owner = cluster // epb
            counter[t] = owner
            if owner in raws:
                set_refcount_in_block(raws[owner], cluster % epb, 1, self.refcount_order)
            else:
                self._set(cluster, 1)
        self._write_dirty()
        for t, cluster in placement.items():
            self.disk.pwrite(cluster * cs, bytes(raws[t]))
        self.disk.flush()
        linked: set[int] = set()
        while len(linked) < len(placement):
            progress = False
            for t, cluster in placement.items():
                owner = counter[t]
                if t in linked or (owner in placement and owner != t and owner not in linked):
                    continue
                self.disk.pwrite(
                    self.refcount_table_offset + 8 * t, to_be64(np.array([cluster * cs]))
                )
                self.disk.flush()
                self.table[t] = cluster * cs
                self._raw[t] = raws[t]
                self._values[t] = decode_refcount_block(bytes(raws[t]), self.refcount_order)
                self.blocks_created.append(cluster * cs)
                linked.add(t)
                progress = True
            if not progress:  # cannot happen: placement is monotone (see docs)
                raise AssertionError("cyclic refcount block placement")

    def _grow_table(self, need_index: int) -> None:
        cs = self.cluster_size
        epb = self.entries_per_block
        old_offset = self.refcount_table_offset
        old_clusters = self.refcount_table_clusters
        old_entries = len(self.table)
        # Start the new area past every used cluster and past the end of the file.
        end_clusters = -(-self.disk.size() // cs)
        area_start = max(end_clusters, self.highest_used_cluster() + 1)
        if len(self._avoid):
            area_start = max(area_start, int(self._avoid[-1]) + 1)
        want_entries = max(need_index + 1, old_entries + 1)
        want_entries += want_entries // 2  # ~50 % headroom, as QEMU does
        table_clusters = max(old_clusters + 1, -(-want_entries * 8 // cs))
        while True:
            if table_clusters * cs > QCOW_MAX_REFTABLE_SIZE:
                raise AllocationError(
                    "the refcount table would exceed QEMU's limit of 8 MiB; the image is too large"
                )
            # Blocks needed by the area (table + new blocks), to a fixpoint.
            nblocks = 0
            while True:
                area_end = area_start + table_clusters + nblocks
                needed = [
                    t
                    for t in range(area_start // epb, (area_end - 1) // epb + 1)
                    if t >= old_entries or self.block_offset(t) == 0
                ]
                if len(needed) == nblocks:
                    break
                nblocks = len(needed)
            new_entries = table_clusters * cs // 8
            highest_t = max([need_index, *needed])
            if highest_t < new_entries:
                break
            table_clusters = -(-(highest_t + 1) * 3 // 2 * 8 // cs)

        table_offset = area_start * cs
        block_clusters = {t: area_start + table_clusters + i for i, t in enumerate(needed)}
        new_table = np.zeros(new_entries, dtype=np.uint64)
        new_table[:old_entries] = self.table
        for t, c in block_clusters.items():
            new_table[t] = c * cs

        new_raw: dict[int, bytearray] = {t: bytearray(cs) for t in block_clusters}
        area = range(area_start, area_start + table_clusters + len(needed))
        for cluster in area:
            t, i = divmod(cluster, epb)
            if t in new_raw:
                set_refcount_in_block(new_raw[t], i, 1, self.refcount_order)
            else:
                self._set(cluster, 1)  # an existing block (linked in both tables)
        # Crash during this phase: only leaks (new area unreferenced by the header;
        # existing blocks count clusters nothing references yet).
        self._write_dirty()
        for t, c in block_clusters.items():
            self.disk.pwrite(c * cs, bytes(new_raw[t]))
        self.disk.pwrite(table_offset, new_table.astype(">u8").tobytes())
        self.disk.flush()
        # The commit point: one 12-byte write switches to the new table.
        self.disk.pwrite(
            layout.HEADER_FIELD.refcount_table_offset,
            layout.RefcountTableLocation.build(
                {"refcount_table_offset": table_offset, "refcount_table_clusters": table_clusters}
            ),
        )
        self.disk.flush()
        self.table = new_table
        self.refcount_table_offset = table_offset
        self.refcount_table_clusters = table_clusters
        for t, raw in new_raw.items():
            self._raw[t] = raw
            self._values[t] = decode_refcount_block(bytes(raw), self.refcount_order)
        self.table_moves.append((old_offset, old_clusters, table_offset, table_clusters))
        self.blocks_created.extend(c * cs for c in block_clusters.values())
        # The old table is no longer referenced: free it (a crash now only leaks it).
        self.free(old_offset, old_clusters)
        self.disk.flush()
