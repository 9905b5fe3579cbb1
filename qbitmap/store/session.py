"""A locked, crash-safe write session on one qcow2 image.

:meth:`WriteSession.open` bundles what every writer needs: the image opened
read-write, QEMU's lock bytes held for the whole session
(:mod:`qbitmap.store.lock`), a :class:`~qbitmap.store.disk.Disk` that can be
swapped for a crash-injecting one, and the cluster allocator
(:mod:`qbitmap.store.alloc`).

Every change follows QEMU's own store order (block/qcow2-bitmap.c
``qcow2_store_persistent_dirty_bitmaps``), which a
caller composes from the methods here:

1. **stage** -- allocate new clusters (:meth:`allocate`, refcounts written)
   and write their contents (:meth:`write_bitmap`, :meth:`write_directory`,
   :meth:`write`).  A crash here leaves the old image plus leaked clusters.
2. **commit** -- :meth:`commit_header` flushes (the staged clusters and their
   refcounts become durable), rewrites cluster 0 -- header, extensions, end
   marker, backing file name -- in ONE write, and flushes again.  This single
   write switches the image from the old structures to the new ones.
3. **release** -- :meth:`free` the clusters only the old structures used, then
   :meth:`flush`.  A crash here leaks the old clusters; nothing references them.

Small in-place updates of a naturally aligned field (a directory entry's
flags, a record's ``consistent_level``) use :meth:`write_field`, which
writes and flushes.

Everything the session does is journaled in :attr:`WriteSession.journal`
(phase, action, offset, length, description), which is what ``--dry-run``
prints: with ``dry_run=True`` the file is opened read-only and writes go to
an in-memory overlay (:class:`~qbitmap.store.overlay.OverlayDisk`) that the
allocator reads back, so the journal shows exactly what a real run would
write where.

Typical use::

    with WriteSession.open(path) as s:
        new = s.write_bitmap(geometry, bits, name="b0")
        directory = s.write_directory(entries)        # entries point at new.table_offset
        s.commit_header(extensions={EXT_BITMAPS: bitmaps_ext_bytes})
        s.free(old_extents, what="old bitmap table")
        s.flush()
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbitmap.errors import RefusedError, UnsupportedImageError
from qbitmap.format import layout
from qbitmap.format.bitmap import Geometry
from qbitmap.format.image import Image, open_image_file
from qbitmap.format.model import (
    AutoclearFeature,
    BitmapEntry,
    BitmapsExtension,
    Extension,
    Header,
    IncompatibleFeature,
    LevelRecord,
)
from qbitmap.store.alloc import Allocator, Extent
from qbitmap.store.disk import Disk, FileDisk
from qbitmap.store.lock import ImageLock
from qbitmap.store.overlay import OverlayDisk

#: Autoclear bits qbitmap understands (and so may leave set when it writes).
KNOWN_AUTOCLEAR = (
    AutoclearFeature.BITMAPS | AutoclearFeature.RAW_EXTERNAL_DATA | AutoclearFeature.QBITMAP_LEVELS
)
KNOWN_INCOMPATIBLE = (
    IncompatibleFeature.DIRTY
    | IncompatibleFeature.CORRUPT
    | IncompatibleFeature.EXTERNAL_DATA_FILE
    | IncompatibleFeature.COMPRESSION_TYPE
    | IncompatibleFeature.EXTENDED_L2
)


@dataclass(frozen=True, slots=True)
class Step:
    """One journaled action of a session."""

    phase: str  # "stage", "commit", "release", "field", "refcount"
    action: str  # "allocate", "write", "flush", "header", "free", "refblock", "reftable"
    offset: int | None
    length: int | None
    what: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class NewBitmap:
    """Where :meth:`WriteSession.write_bitmap` put a bitmap."""

    table_offset: int
    table_size: int  # entries
    table_extent: Extent
    data_extent: Extent | None  # the data clusters (contiguous), if any
    ones_entries: int  # table entries using the all-ones encoding

    @property
    def extents(self) -> list[Extent]:
        out = [self.table_extent]
        if self.data_extent is not None:
            out.append(self.data_extent)
        return out


def validate_for_write(image: Image) -> None:
    """Raise unless *image* may be written by qbitmap at all.

    Refused (exit 2): the dirty bit (lazy refcounts left refcounts stale),
    the corrupt bit, a header extension area that cannot be parsed.
    Unsupported (exit 1): version 2 (QEMU keeps no persistent bitmaps there),
    unknown incompatible features, refcount_order above 6.
    An external data file and encryption are fine: bitmap clusters always
    live in the qcow2 file itself, and those clusters are all refcounted.
    """
    header = image.header
    path = image.path
    if header.version < 3:
        raise UnsupportedImageError(
            f"{path}: qcow2 version 2 image: QEMU keeps no persistent bitmaps in v2 images"
        )
    incompatible = header.incompatible_features or 0
    unknown = incompatible & ~int(KNOWN_INCOMPATIBLE)
    if unknown:
        raise UnsupportedImageError(
            f"{path}: unknown incompatible feature bits {unknown:#x}; qbitmap will not write it"
        )
    if incompatible & IncompatibleFeature.CORRUPT:
        raise RefusedError(
            f"{path}: the image has the corrupt bit set; repair it with 'qemu-img check -r all' first"
        )
    if incompatible & IncompatibleFeature.DIRTY:
        raise RefusedError(
            f"{path}: the image has the dirty bit set (lazy refcounts): its refcounts may be stale; "
            "repair it with 'qemu-img check -r all' first"
        )
    if header.effective_refcount_order > 6:
        raise UnsupportedImageError(f"{path}: refcount_order {header.refcount_order} is above 6")
    if image.extension_error is not None:
        raise RefusedError(f"{path}: {image.extension_error}")


class WriteSession:
    """A locked image open for writing; see the module docstring for the protocol.

    Attributes:
        path: the image file.
        image: the image as it was when the session opened (for reading the
            old structures); not updated by commits.
        header: the current header (updated by :meth:`commit_header` and by
            refcount table growth).
        extensions: the current header extensions, in order.
        backing_name: the backing file name bytes (b"" if none).
        disk: the Disk all writes go through.
        allocator: the cluster allocator.
        journal: every action so far.
        dry_run: True if writes only go to an in-memory overlay.
    """

    def __init__(
        self, path: Path, image: Image, disk: Disk, lock: ImageLock, *, dry_run: bool
    ) -> None:
        self.path = path
        self.image = image
        self.disk = disk
        self.lock = lock
        self.dry_run = dry_run
        self.header: Header = image.header
        self.extensions: list[Extension] = list(image.extensions)
        self.backing_name = b""
        if image.header.backing_file_offset:
            self.backing_name = image.pread(
                image.header.backing_file_offset, image.header.backing_file_size
            )
        self.cluster_size = image.cluster_size
        self.journal: list[Step] = []
        self.commits = 0
        self.allocator = Allocator(
            disk,
            cluster_bits=image.cluster_bits,
            refcount_order=image.header.effective_refcount_order,
            refcount_table_offset=image.header.refcount_table_offset,
            refcount_table_clusters=image.header.refcount_table_clusters,
        )
        self._seen_blocks = 0
        self._seen_moves = 0
        self._unknown_cleared = False

    # -- opening -----------------------------------------------------------------

    @classmethod
    @contextmanager
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        dry_run: bool = False,
        disk_wrapper: Callable[[Disk], Disk] | None = None,
    ) -> Iterator[WriteSession]:
        """Open *path*, take QEMU's lock bytes, validate, and yield a session.

        Args:
            path: the qcow2 image.
            dry_run: open read-only; writes go to an in-memory overlay.
            disk_wrapper: wraps the FileDisk (tests crash it at a chosen write).

        Raises:
            ImageBusyError: another process holds the lock bytes (nothing changed).
            RefusedError / UnsupportedImageError: see :func:`validate_for_write`.
        """
        path = Path(path)
        fd = open_image_file(path, writable=not dry_run)
        lock = ImageLock(fd, path)
        try:
            lock.acquire()
            # Parse only after locking: what we read now cannot change under us.
            image = Image(path, fd)
            validate_for_write(image)
            disk: Disk = FileDisk(fd, path)
            if disk_wrapper is not None:
                disk = disk_wrapper(disk)
            if dry_run:
                disk = OverlayDisk(disk)
            session = cls(path, image, disk, lock, dry_run=dry_run)
            yield session
        finally:
            lock.release()
            os.close(fd)

    def _before_writing(self) -> None:
        """Clear autoclear bits qbitmap does not know, once, before its first write.

        qcow2: a writer must clear unknown autoclear bits before it changes
        anything.  Done lazily, so that opening a session (and deciding to
        refuse) writes nothing.
        """
        if self._unknown_cleared:
            return
        self._unknown_cleared = True
        autoclear = self.header.autoclear_features or 0
        unknown = autoclear & ~int(KNOWN_AUTOCLEAR)
        if unknown:
            self.commit_header(autoclear_clear=unknown, what="clear unknown autoclear bits")

    @property
    def write_log(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every write issued so far (to the overlay in a dry run)."""
        stats = getattr(self.disk, "stats", None)
        return list(stats.write_log) if stats is not None else []

    # -- journal ---------------------------------------------------------------

    def _log(
        self, phase: str, action: str, offset: int | None, length: int | None, what: str
    ) -> None:
        self.journal.append(Step(phase, action, offset, length, what))

    def _log_structure_changes(self, what: str) -> None:
        alloc = self.allocator
        for offset in alloc.blocks_created[self._seen_blocks :]:
            self._log(
                "refcount", "refblock", offset, self.cluster_size, f"new refcount block ({what})"
            )
        self._seen_blocks = len(alloc.blocks_created)
        for old_off, old_n, new_off, new_n in alloc.table_moves[self._seen_moves :]:
            self._log(
                "refcount",
                "reftable",
                new_off,
                new_n * self.cluster_size,
                f"refcount table grown from {old_n} clusters at {old_off:#x} to {new_n} clusters",
            )
            self.header = dataclasses.replace(
                self.header, refcount_table_offset=new_off, refcount_table_clusters=new_n
            )
        self._seen_moves = len(alloc.table_moves)

    # -- primitives ------------------------------------------------------------

    def allocate(self, size: int, *, what: str) -> Extent:
        """Allocate whole clusters for *size* bytes (refcount 1, written, not flushed)."""
        self._before_writing()
        extent = self.allocator.allocate_bytes(size)
        self._log_structure_changes(what)
        self._log("stage", "allocate", extent.offset, extent.count * self.cluster_size, what)
        return extent

    def write(self, offset: int, data: bytes, *, what: str, phase: str = "stage") -> None:
        """Write *data* at *offset* -- only into clusters this session allocated."""
        self._before_writing()
        self.disk.pwrite(offset, data)
        self._log(phase, "write", offset, len(data), what)

    def flush(self, *, what: str = "flush") -> None:
        self.disk.flush()
        self._log("flush", "flush", None, None, what)

    def free(self, extents: Iterable[Extent], *, what: str, references: int = 1) -> None:
        """Drop *references* references from each cluster of *extents* (after the commit)."""
        self._before_writing()
        for extent in extents:
            self.allocator.free(extent.offset, extent.count, references=references)
            self._log("release", "free", extent.offset, extent.count * self.cluster_size, what)

    def write_field(self, offset: int, data: bytes, *, what: str) -> None:
        """Overwrite a small, naturally aligned field in place, then flush.

        For writes that are atomic on their own (a 4-byte flags word or
        ``consistent_level``).  Writes and flushes before returning.
        """
        self._before_writing()
        if len(data) not in (1, 2, 4, 8) or offset % len(data):
            raise ValueError(
                f"in-place field writes must be 1/2/4/8 aligned bytes, not {len(data)} at {offset:#x}"
            )
        self.disk.pwrite(offset, data)
        self._log("field", "write", offset, len(data), what)
        self.disk.flush()
        self._log("field", "flush", None, None, what)

    # -- bitmaps ---------------------------------------------------------------

    def write_bitmap(self, geometry: Geometry, bits: np.ndarray, *, name: str = "") -> NewBitmap:
        """Stage a bitmap's data and table in new clusters.

        *bits* is the whole bitmap, ``geometry.nbytes`` uint8, LSB first.
        A data-cluster-sized chunk with no set bit gets table entry 0; a
        chunk that covers only bits inside the disk and has all of them set
        gets the all-ones entry (1); any other chunk gets a new data cluster
        (contiguous with the other data clusters), tail zero-filled.  Bits
        past the end of the disk are written as 0.  Not flushed.
        """
        cs = self.cluster_size
        bpc = geometry.bits_per_cluster
        nbits = geometry.nbits
        table_size = geometry.table_size
        if len(bits) != geometry.nbytes:
            raise ValueError(f"bitmap has {len(bits)} bytes, the geometry says {geometry.nbytes}")
        bits = bits.copy()
        rem = nbits % 8
        if rem and len(bits):
            bits[-1] &= (1 << rem) - 1
        label = f"bitmap {name!r}" if name else "bitmap"
        kinds: list[str] = []
        for i in range(table_size):
            chunk = bits[i * cs : (i + 1) * cs]
            if not chunk.any():
                kinds.append("zero")
            elif (i + 1) * bpc <= nbits and len(chunk) == cs and bool((chunk == 0xFF).all()):
                kinds.append("ones")
            else:
                kinds.append("data")
        ndata = kinds.count("data")
        data_extent = None
        table = np.zeros(table_size, dtype=np.uint64)
        if ndata:
            data_extent = self.allocate(ndata * cs, what=f"{label} data ({ndata} clusters)")
            buf = bytearray(ndata * cs)
            slot = 0
            for i, kind in enumerate(kinds):
                if kind == "data":
                    chunk = bits[i * cs : (i + 1) * cs]
                    buf[slot * cs : slot * cs + len(chunk)] = chunk.tobytes()
                    table[i] = data_extent.offset + slot * cs
                    slot += 1
            self.write(data_extent.offset, bytes(buf), what=f"{label} data")
        ones = 0
        for i, kind in enumerate(kinds):
            if kind == "ones":
                table[i] = layout.BITMAP_TABLE_ALL_ONES
                ones += 1
        table_bytes = table.astype(">u8").tobytes()
        table_extent = self.allocate(len(table_bytes), what=f"{label} table ({table_size} entries)")
        padded = table_bytes + bytes(table_extent.count * cs - len(table_bytes))
        self.write(table_extent.offset, padded, what=f"{label} table")
        return NewBitmap(table_extent.offset, table_size, table_extent, data_extent, ones)

    def write_directory(self, entries: Sequence[BitmapEntry]) -> tuple[Extent, int]:
        """Stage a bitmap directory holding *entries* (built verbatim) in new clusters.

        Returns the extent and the exact directory size in bytes.  Not flushed.
        """
        data = b"".join(entry.build() for entry in entries)
        if not data:
            raise ValueError("a bitmap directory needs at least one entry")
        extent = self.allocate(len(data), what=f"bitmap directory ({len(entries)} entries)")
        padded = data + bytes(extent.count * self.cluster_size - len(data))
        self.write(extent.offset, padded, what="bitmap directory")
        return extent, len(data)

    # -- header ----------------------------------------------------------------

    def build_cluster0(
        self,
        *,
        extensions: Mapping[int, bytes | None] | None = None,
        autoclear_set: int = 0,
        autoclear_clear: int = 0,
    ) -> tuple[bytes, Header, list[Extension]]:
        """The new first cluster: header, extensions, end marker, backing name.

        *extensions* maps a magic to its new data (replaced in place, or
        appended after the others if absent) or to None (removed).  Other
        extensions are kept verbatim (data and padding), in order.
        """
        changes = dict(extensions or {})
        new_exts: list[Extension] = []
        replaced: set[int] = set()
        for ext in self.extensions:
            if ext.magic in changes:
                # One copy, where the first one was: repeats would override it for QEMU.
                data = changes[ext.magic]
                if data is None or ext.magic in replaced:
                    continue
                replaced.add(ext.magic)
                new_exts.append(Extension(0, ext.magic, data, bytes(-len(data) % 8)))
            else:
                new_exts.append(ext)
        for magic in replaced:
            changes.pop(magic)
        for magic, data in changes.items():
            if data is not None and magic not in replaced:
                new_exts.append(Extension(0, magic, data, bytes(-len(data) % 8)))
        autoclear = ((self.header.autoclear_features or 0) | autoclear_set) & ~autoclear_clear
        header = dataclasses.replace(
            self.header,
            autoclear_features=autoclear,
            refcount_table_offset=self.allocator.refcount_table_offset,
            refcount_table_clusters=self.allocator.refcount_table_clusters,
        )
        ext_area = b"".join(ext.build() for ext in new_exts) + bytes(8)  # end marker
        start = header.effective_header_length
        backing_offset = start + len(ext_area) if self.backing_name else 0
        header = dataclasses.replace(
            header,
            backing_file_offset=backing_offset,
            backing_file_size=len(self.backing_name)
            if self.backing_name
            else header.backing_file_size,
        )
        head = header.build()
        if len(head) != start:
            raise UnsupportedImageError(
                f"{self.path}: the header builds to {len(head)} bytes, header_length says {start}"
            )
        cluster0 = head + ext_area + self.backing_name
        if len(cluster0) > self.cluster_size:
            raise UnsupportedImageError(
                f"{self.path}: header, extensions and backing file name need {len(cluster0)} bytes, "
                f"more than the {self.cluster_size}-byte first cluster"
            )
        # Re-derive extension offsets for the in-memory view.
        placed: list[Extension] = []
        pos = start
        for ext in new_exts:
            placed.append(Extension(pos, ext.magic, ext.data, ext.padding))
            pos += ext.total_size
        return cluster0 + bytes(self.cluster_size - len(cluster0)), header, placed

    def commit_header(
        self,
        *,
        extensions: Mapping[int, bytes | None] | None = None,
        autoclear_set: int = 0,
        autoclear_clear: int = 0,
        what: str = "header",
    ) -> None:
        """The commit point: flush, rewrite cluster 0 in one write, flush.

        See :meth:`build_cluster0` for *extensions*.  Before the write every
        staged cluster and refcount is made durable; after it the new header
        is.  A crash before the write leaves the old header (and leaks), after
        the flush the new one.
        """
        self._before_writing()
        cluster0, header, placed = self.build_cluster0(
            extensions=extensions, autoclear_set=autoclear_set, autoclear_clear=autoclear_clear
        )
        self.flush(what=f"make staged clusters durable before: {what}")
        self.disk.pwrite(0, cluster0)
        self._log("commit", "header", 0, len(cluster0), what)
        self.flush(what=f"make the header durable: {what}")
        self.header = header
        self.extensions = placed
        self.commits += 1

    # -- reading the current state -----------------------------------------------------

    def extension(self, magic: int) -> Extension | None:
        """The extension of type *magic* QEMU uses: the last one of that type."""
        found = None
        for ext in self.extensions:
            if ext.magic == magic:
                found = ext
        return found

    @property
    def bitmaps_extension(self) -> BitmapsExtension | None:
        ext = self.extension(layout.EXT_BITMAPS)
        if ext is None or len(ext.data) != 24:
            return None
        return BitmapsExtension.decode(ext.data, offset=ext.data_offset)


def bitmaps_extension_bytes(nb_bitmaps: int, directory_offset: int, directory_size: int) -> bytes:
    """The 24 data bytes of a bitmaps extension."""
    return bytes(
        layout.BitmapsExtension.build(
            {
                "nb_bitmaps": nb_bitmaps,
                "reserved32": 0,
                "bitmap_directory_size": directory_size,
                "bitmap_directory_offset": directory_offset,
            }
        )
    )


def levels_extension_bytes(
    records: Sequence[LevelRecord], *, version: int = layout.LEVELS_VERSION
) -> bytes:
    """The data of a consistency-level extension holding *records* (built verbatim)."""
    head = bytes(
        layout.LevelsExtensionHeader.build({"version": version, "nb_records": len(records)})
    )
    return head + b"".join(record.build() for record in records)


def new_level_record(
    name: bytes,
    *,
    bitmap_table_offset: int,
    consistent_level: int,
    level_bits: int,
    max_level: int,
    granularity_bits: int,
) -> LevelRecord:
    """A fresh LevelRecord (offset 0 until it is placed by a commit)."""
    return LevelRecord(
        offset=0,
        bitmap_table_offset=bitmap_table_offset,
        consistent_level=consistent_level,
        level_bits=level_bits,
        max_level=max_level,
        granularity_bits=granularity_bits,
        name=name,
        padding=bytes(-(layout.LEVEL_RECORD_FIXED_SIZE + len(name)) % 8),
    )


def entry_extents(entry: BitmapEntry, table: np.ndarray, cluster_size: int) -> list[Extent]:
    """The clusters one bitmap references: its table, then each data cluster.

    One Extent per reference (a data cluster named twice appears twice),
    matching how ``qemu-img check`` counts references.
    """
    table_bytes = entry.bitmap_table_size * 8
    out = [Extent(entry.bitmap_table_offset, max(1, -(-table_bytes // cluster_size)))]
    offsets = table & np.uint64(layout.BITMAP_TABLE_OFFSET_MASK)
    for offset in offsets[offsets != 0].tolist():
        out.append(Extent(int(offset), 1))
    return out


def directory_extent(offset: int, size: int, cluster_size: int) -> Extent:
    """The clusters a directory of *size* bytes at *offset* occupies."""
    first = offset // cluster_size
    last = (offset + size - 1) // cluster_size
    return Extent(first * cluster_size, last - first + 1)
