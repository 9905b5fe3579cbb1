"""The Tracker's storage in a qcow2 image, through ``qbitmap.store``.

:class:`ImageBackend` keeps one bitmap's record and data in the image while
a :class:`~qbitmap.store.session.WriteSession` holds QEMU's lock bytes:

* ``begin``: one cluster-0 rewrite puts the record (``c = max_level``) into
  the consistency-level extension and sets autoclear bit 63, flushed; then
  ``in_use`` is set on the directory entry with one 4-byte write, flushed.
* ``set_level``: one 4-byte write of the record's ``consistent_level``, flushed.
* ``store``: changed data clusters are overwritten in place (``T`` only grows
  between flushes, so this only sets bits); a chunk without a data cluster
  gets a new one, allocated (refcount 1) and written, then everything is
  flushed, and only then are the new clusters linked from the bitmap table
  (8-byte entry writes), flushed.
* ``end``: ``in_use`` cleared (flushed), then one cluster-0 rewrite removes
  the record, and bit 63 with it when no record remains (flushed).

Records of other bitmaps are kept while bit 63 is set.  If bit 63 is clear
when we open, every record in the image is already stale (a program that
does not maintain them wrote the image) and they are dropped: setting bit 63
again must not make them look trusted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import numpy as np

from qbitmap import levels
from qbitmap.errors import RefusedError, UnsupportedImageError, UsageError
from qbitmap.format import (
    AutoclearFeature,
    BitmapEntry,
    BitmapFlag,
    Geometry,
    LevelRecord,
    layout,
    parse_levels_extension,
    read_bits,
    table_entry_problem,
)
from qbitmap.format.entries import bitmap_table_entries, to_be64
from qbitmap.store.disk import Disk
from qbitmap.store.session import WriteSession, levels_extension_bytes, new_level_record

LEVELS_BIT = int(AutoclearFeature.QBITMAP_LEVELS)
ENTRY = layout.BITMAP_DIR_ENTRY_FIELD


class ImageBackend:
    """Backend of a Tracker on one bitmap of a qcow2 image.

    Use :meth:`open`; it reads the bitmap (which must be consistent) and
    holds the image's lock bytes until :meth:`end` or :meth:`abandon`.
    """

    def __init__(
        self, stack: ExitStack, session: WriteSession, entry: BitmapEntry, level_bits: int
    ) -> None:
        self._stack = stack
        self.session = session
        self.entry = entry
        self.level_bits = level_bits
        image = session.image
        self.geometry = Geometry(image.virtual_size, entry.granularity, image.cluster_size)
        self.max_level = levels.max_level(self.geometry.nbits, level_bits)
        self.table = image.read_bitmap_table(entry).copy()
        self._check_table()
        self.initial_bits = read_bits(image, entry, self.table)
        self._level_offset: int | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        bitmap: str | bytes,
        *,
        level_bits: int,
        disk_wrapper: Callable[[Disk], Disk] | None = None,
    ) -> ImageBackend:
        """Lock *path* and prepare to track *bitmap*; nothing is written yet."""
        if not levels.MIN_LEVEL_BITS <= level_bits <= levels.MAX_LEVEL_BITS:
            raise UsageError(f"level_bits must be 1..16, not {level_bits}")
        name = bitmap.encode() if isinstance(bitmap, str) else bytes(bitmap)
        stack = ExitStack()
        try:
            session = stack.enter_context(WriteSession.open(path, disk_wrapper=disk_wrapper))
            entry = _find_bitmap(session, name)
            return cls(stack, session, entry, level_bits)
        except BaseException:
            stack.close()
            raise

    # -- reading ---------------------------------------------------------------

    def _check_table(self) -> None:
        entry, geo, session = self.entry, self.geometry, self.session
        cs = session.cluster_size
        if entry.bitmap_table_size != geo.table_size:
            raise RefusedError(
                f"bitmap {entry.display_name!r}: bitmap_table_size is {entry.bitmap_table_size}, "
                f"the disk needs {geo.table_size}; run 'qbitmap check'"
            )
        owned = [entry.bitmap_table_offset + i * cs for i in range(-(-geo.table_size * 8 // cs))]
        classes = bitmap_table_entries(self.table, cs)
        bad = np.flatnonzero(classes.invalid)
        if len(bad):
            i = int(bad[0])
            raise RefusedError(
                f"bitmap {entry.display_name!r} table entry {i}: "
                f"{table_entry_problem(int(self.table[i]), cs)}; run 'qbitmap check'"
            )
        owned += classes.offsets[classes.data].tolist()
        # Data clusters are rewritten in place and table entries updated in
        # place: both must belong to this bitmap alone.
        for offset in owned:
            refcount = session.allocator.refcount(offset // cs)
            if refcount != 1:
                raise RefusedError(
                    f"bitmap {entry.display_name!r}: cluster {offset:#x} has refcount {refcount}, "
                    "not 1; run 'qbitmap check'"
                )

    # -- Backend ---------------------------------------------------------------

    def begin(self, consistent_level: int) -> None:
        session, entry = self.session, self.entry
        record = new_level_record(
            entry.name,
            bitmap_table_offset=entry.bitmap_table_offset,
            consistent_level=consistent_level,
            level_bits=self.level_bits,
            max_level=self.max_level,
            granularity_bits=entry.granularity_bits,
        )
        others = self._other_records()
        session.commit_header(
            extensions={layout.EXT_LEVELS: levels_extension_bytes([*others, record])},
            autoclear_set=LEVELS_BIT,
            what=f"consistency-level record for bitmap {entry.display_name!r}",
        )
        mine = self._my_record()
        assert mine is not None
        self._level_offset = mine.consistent_level_offset
        session.write_field(
            entry.field_offset("flags"),
            ENTRY.build("flags", int(entry.flags | BitmapFlag.IN_USE)),
            what=f"set in_use on bitmap {entry.display_name!r}",
        )

    def set_level(self, consistent_level: int) -> None:
        assert self._level_offset is not None
        self.session.write_field(
            self._level_offset,
            layout.LEVEL_RECORD_FIELD.build("consistent_level", consistent_level),
            what=f"consistent_level {consistent_level}",
        )

    def store(self, bits: np.ndarray, clusters: Sequence[int]) -> None:
        session, entry = self.session, self.entry
        cs = session.cluster_size
        label = f"bitmap {entry.display_name!r}"
        links: list[int] = []
        for i in clusters:
            chunk = bits[i * cs : (i + 1) * cs].tobytes()
            word = int(self.table[i])
            offset = word & layout.BITMAP_TABLE_OFFSET_MASK
            if offset == 0:
                if word & layout.BITMAP_TABLE_ALL_ONES:
                    continue  # all ones already: T cannot add anything
                offset = session.allocate(cs, what=f"{label} data cluster {i}").offset
                links.append(i)
                self.table[i] = offset
            session.write(offset, chunk + bytes(cs - len(chunk)), what=f"{label} data cluster {i}")
        session.flush(what=f"{label} data")
        if links:
            for i in links:
                session.write(
                    entry.bitmap_table_offset + 8 * i,
                    to_be64(self.table[i : i + 1]),
                    what=f"{label} table entry {i}",
                )
            session.flush(what=f"{label} table")

    def end(self) -> None:
        session, entry = self.session, self.entry
        session.write_field(
            entry.field_offset("flags"),
            ENTRY.build("flags", int(entry.flags & ~BitmapFlag.IN_USE)),
            what=f"clear in_use on bitmap {entry.display_name!r}",
        )
        others = self._other_records()
        if others:
            session.commit_header(
                extensions={layout.EXT_LEVELS: levels_extension_bytes(others)},
                what=f"remove the record of bitmap {entry.display_name!r}",
            )
        else:
            session.commit_header(
                extensions={layout.EXT_LEVELS: None},
                autoclear_clear=LEVELS_BIT,
                what=f"remove the record of bitmap {entry.display_name!r} and autoclear bit 63",
            )
        self.abandon()

    def abandon(self) -> None:
        self._stack.close()

    # -- records ---------------------------------------------------------------

    def _records(self) -> tuple[LevelRecord, ...]:
        ext = self.session.extension(layout.EXT_LEVELS)
        if ext is None:
            return ()
        parsed = parse_levels_extension(ext.data, offset=ext.data_offset)
        if parsed.version != layout.LEVELS_VERSION:
            raise UnsupportedImageError(
                f"{self.session.path}: the consistency-level extension has version "
                f"{parsed.version}; qbitmap writes version {layout.LEVELS_VERSION} only"
            )
        if parsed.error is not None:
            raise RefusedError(
                f"{self.session.path}: the consistency-level extension cannot be parsed "
                f"({parsed.error}); run 'qbitmap check'"
            )
        return parsed.records

    def _other_records(self) -> list[LevelRecord]:
        """Records to keep beside ours: none if bit 63 is clear (they are all stale)."""
        records = self._records()
        if not (self.session.header.autoclear_features or 0) & LEVELS_BIT:
            return []
        return [r for r in records if r.name != self.entry.name]

    def _my_record(self) -> LevelRecord | None:
        for record in self._records():
            if record.name == self.entry.name:
                return record
        return None


def _find_bitmap(session: WriteSession, name: bytes) -> BitmapEntry:
    image = session.image
    shown = name.decode("utf-8", "backslashreplace")
    if not (image.header.autoclear_features or 0) & AutoclearFeature.BITMAPS:
        if image.bitmaps_extension is not None:
            raise RefusedError(
                f"{image.path}: autoclear bit 0 is clear, QEMU ignores the image's bitmaps"
            )
        raise UsageError(f"{image.path}: no bitmap named {shown!r}")
    directory = image.read_directory()
    if directory.error is not None:
        raise RefusedError(f"{image.path}: {directory.error}; run 'qbitmap check'")
    for entry in directory.entries:
        if entry.name == name:
            break
    else:
        raise UsageError(f"{image.path}: no bitmap named {shown!r}")
    if entry.in_use:
        raise RefusedError(
            f"{image.path}: bitmap {shown!r} is in use (stale after a crash, or tracked by "
            "another writer); run 'qbitmap recover' first"
        )
    if entry.type != 1 or entry.extra_data:
        raise UnsupportedImageError(
            f"{image.path}: bitmap {shown!r} is not a plain dirty tracking bitmap"
        )
    if entry.offset % 8:
        raise RefusedError(f"{image.path}: bitmap {shown!r} directory entry is not 8-byte aligned")
    return entry
