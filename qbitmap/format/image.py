"""Open a qcow2 image and locate its header, extensions and bitmap directory.

Every read is bounded by what the file holds: a length taken from the image
is checked against the file size (and a fixed cap where the spec has one)
before any buffer is allocated, so a lying header cannot make qbitmap read
or allocate gigabytes.  Parse failures become ``ImageFormatError`` carrying
the file offset and the field.

Sources: docs/interop/qcow2.rst "Header", "Header extensions", "Bitmaps";
QEMU block/qcow2.c ``qcow2_do_open``/``qcow2_read_extensions``.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from qbitmap.errors import ImageFormatError, ImageIOError, QbitmapError
from qbitmap.format import layout
from qbitmap.format.entries import be64
from qbitmap.format.model import (
    DEFAULT_FEATURE_NAMES,
    AutoclearFeature,
    BitmapEntry,
    BitmapsExtension,
    BitmapStructures,
    Extension,
    Header,
    HeaderArea,
    LevelRecord,
    feature_name_entries,
)
from qbitmap.format.schema import LayoutError, Parsed, Schema

# The bitmap directory is read in windows of this size, as far as its entries reach.
DIRECTORY_READ_WINDOW = 64 * 1024
H = layout.HEADER_FIELD


def _size_of(fd: int) -> int:
    """Size in bytes of a regular file or a block device (st_size is 0 for the latter)."""
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode):
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            raise ImageIOError(f"cannot find the size of the block device: {exc.strerror}") from exc
    return info.st_size


def parse_bytes(schema: Schema, data: bytes, *, offset: int, what: str) -> Parsed:
    """Parse *data* (read from file *offset*) with *schema*, as a qbitmap error on failure."""
    try:
        return schema.parse(data)
    except LayoutError as exc:
        raise ImageFormatError(
            f"cannot parse {what}: {exc}", offset=offset + exc.offset, field=exc.field
        ) from exc


@dataclass(frozen=True, slots=True)
class Directory:
    """The bitmap directory as far as it could be parsed.

    ``error`` is the first structural problem, of kind ``problem``:
    "location" (the directory cannot be read at all: too large, past the end
    of the file, too many bitmaps claimed), "broken" (an entry crosses the
    directory's end) or "count" (more or fewer entries than nb_bitmaps).
    """

    offset: int
    size: int
    entries: tuple[BitmapEntry, ...]
    error: ImageFormatError | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class LevelsExtension:
    """Data of the qbitmap consistency-level extension."""

    offset: int  # file offset of the extension data
    version: int
    nb_records: int
    records: tuple[LevelRecord, ...]
    trailing: bytes  # bytes after the last record (should be none)
    error: ImageFormatError | None


def open_image_file(path: str | os.PathLike[str], *, writable: bool = False) -> int:
    """Open an image file and return its descriptor: a regular file or a block device only.

    Opened with O_NONBLOCK first, so that a FIFO (or a device that would block)
    is refused at once instead of hanging the caller, then switched back to
    blocking reads.  Raises ImageIOError naming the file.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageIOError(f"{path}: is a directory, not an image")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageIOError(f"{path}: not a regular file or block device")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _be32(data: bytes, offset: int) -> int:
    """The big-endian 32-bit field at *offset* of *data* (header fields read before parsing)."""
    return int.from_bytes(data[offset : offset + 4], "big")


def pread_full(fd: int, offset: int, length: int) -> bytes:
    """Read *length* bytes at *offset*, looping over short reads; short only at end of file.

    Raises OSError as the system reports it; callers word the message.
    """
    chunks = []
    while length > 0:
        data = os.pread(fd, min(length, 1 << 30), offset)
        if not data:
            break
        chunks.append(data)
        offset += len(data)
        length -= len(data)
    return b"".join(chunks)


class Image:
    """A qcow2 image opened for reading (and, for the writers, for writing).

    Use :meth:`open` as a context manager.  The header and the header
    extensions are parsed on open; everything else is read on demand.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.file_size = _size_of(fd)
        self.header = self._parse_header()
        self.cluster_size = self.header.cluster_size
        self.cluster_bits = self.header.cluster_bits
        self.virtual_size = self.header.virtual_size
        self.extensions: list[Extension] = []
        self.extension_error: ImageFormatError | None = None
        self.end_marker_offset: int | None = None
        self.end_marker_length = 0
        self._parse_extensions()

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Image:
        """Open *path* read-only (writers open their own descriptor: ``qbitmap.store``)."""
        path = Path(path)
        fd = open_image_file(path)
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- bounded reads -------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to *length* bytes at *offset* (short at end of file)."""
        try:
            return pread_full(self.fd, offset, length)
        except OSError as exc:
            raise ImageIOError(f"offset {offset:#x}: read failed: {exc.strerror}") from exc

    def read_into(self, offset: int, out: memoryview) -> int:
        """Fill *out* from file *offset*; the number of bytes read (short only at end of file)."""
        done = 0
        while done < len(out):
            try:
                n = os.preadv(self.fd, [out[done:]], offset + done)
            except OSError as exc:
                raise ImageIOError(
                    f"offset {offset + done:#x}: read failed: {exc.strerror}"
                ) from exc
            if n == 0:
                break
            done += n
        return done

    def read(self, offset: int, length: int, *, what: str, field: str | None = None) -> bytes:
        """Read exactly *length* bytes of *what*, which must lie inside the file."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise ImageFormatError(
                f"{what} ({length} bytes at {offset:#x}) extends past the end of the file "
                f"({self.file_size} bytes)",
                offset=offset,
                field=field,
            )
        data = self.pread(offset, length)
        if len(data) != length:
            raise ImageFormatError(f"{what} is truncated", offset=offset, field=field)
        return data

    # -- header ----------------------------------------------------------------

    def _parse_header(self) -> Header:
        head = self.pread(0, 4096)
        if len(head) < 4 or head[: len(layout.MAGIC)] != layout.MAGIC:
            found = head[:4].hex() if head else "an empty file"
            raise ImageFormatError(
                f"not a qcow2 image (magic is {found}, expected 514649fb)",
                offset=H.magic,
                field="magic",
            )
        if len(head) < H.version + 4:
            raise ImageFormatError("qcow2 header is truncated", offset=H.version, field="version")
        # The fields that bound the rest of the header, checked before it is parsed.
        version = _be32(head, H.version)
        if version not in (2, 3):
            raise ImageFormatError(
                f"unsupported qcow2 version {version} (QEMU knows 2 and 3)",
                offset=H.version,
                field="version",
            )
        fixed = layout.V2_HEADER_LENGTH if version == 2 else layout.V3_MIN_HEADER_LENGTH
        if len(head) < fixed:
            raise ImageFormatError(
                f"qcow2 v{version} header needs {fixed} bytes, the file has {len(head)}",
                offset=0,
                field="header",
            )
        cluster_bits = _be32(head, H.cluster_bits)
        if not layout.MIN_CLUSTER_BITS <= cluster_bits <= layout.MAX_CLUSTER_BITS:
            raise ImageFormatError(
                f"cluster_bits is {cluster_bits}, QEMU accepts "
                f"{layout.MIN_CLUSTER_BITS}..{layout.MAX_CLUSTER_BITS}",
                offset=H.cluster_bits,
                field="cluster_bits",
            )
        if version == 3:
            header_length = _be32(head, H.header_length)
            if header_length < layout.V3_MIN_HEADER_LENGTH:
                raise ImageFormatError(
                    f"header_length is {header_length}, a v3 header has at least "
                    f"{layout.V3_MIN_HEADER_LENGTH} bytes",
                    offset=H.header_length,
                    field="header_length",
                )
            if header_length > 1 << cluster_bits:
                raise ImageFormatError(
                    f"header_length {header_length} is larger than the cluster size "
                    f"{1 << cluster_bits}",
                    offset=H.header_length,
                    field="header_length",
                )
            if header_length > len(head):
                head = self.read(0, header_length, what="qcow2 header", field="header_length")
        container = parse_bytes(layout.Header, head, offset=0, what="qcow2 header")
        return Header.from_container(container)

    # -- header extensions -----------------------------------------------------------

    @property
    def extension_area_end(self) -> int:
        """End of the extension area: the backing file name, or the first cluster's end."""
        bfo = self.header.backing_file_offset
        if 0 < bfo < self.cluster_size:
            return bfo
        return self.cluster_size

    def _parse_extensions(self) -> None:
        offset = self.header.effective_header_length
        end = self.extension_area_end
        area = self.pread(offset, max(0, end - offset))
        base = offset
        while offset + 8 <= end:
            rel = offset - base
            if rel + 8 > len(area):
                self.extension_error = ImageFormatError(
                    "header extension area is truncated by the end of the file",
                    offset=offset,
                    field="header extension",
                )
                return
            head = layout.ExtensionHeader.parse(area[rel : rel + layout.EXTENSION_HEADER_SIZE])
            magic, length = head.magic, head.length
            if magic == layout.EXT_END:
                self.end_marker_offset = offset
                self.end_marker_length = length
                return
            padded = (length + 7) & ~7
            if offset + 8 + padded > end:
                self.extension_error = ImageFormatError(
                    f"header extension {magic:#010x} of {length} bytes crosses the end of the "
                    f"extension area at {end:#x} (QEMU: 'Header extension too large')",
                    offset=offset + layout.EXTENSION_FIELD.length,
                    field="length",
                )
                return
            if rel + 8 + padded > len(area):
                self.extension_error = ImageFormatError(
                    f"header extension {magic:#010x} is truncated by the end of the file",
                    offset=offset,
                    field="header extension",
                )
                return
            data = area[rel + 8 : rel + 8 + length]
            padding = area[rel + 8 + length : rel + 8 + padded]
            self.extensions.append(
                Extension(offset=offset, magic=magic, data=data, padding=padding)
            )
            offset += 8 + padded
        # No end marker: the area simply ran out (QEMU accepts this).

    def read_header_area(self) -> HeaderArea:
        """The whole first cluster as a :class:`HeaderArea` (``build()`` gives it back)."""
        cluster = self.pread(0, self.cluster_size)
        pos = self.header.effective_header_length
        if self.extensions:
            pos = self.extensions[-1].offset + self.extensions[-1].total_size
        end_marker = None
        if self.end_marker_offset is not None:
            end_marker = cluster[self.end_marker_offset : self.end_marker_offset + 8]
            pos = self.end_marker_offset + 8
        pos = min(pos, len(cluster))
        bfo, bfs = self.header.backing_file_offset, self.header.backing_file_size
        backing = None
        if bfo and pos <= bfo and bfo + bfs <= len(cluster):
            backing = cluster[bfo : bfo + bfs]
            gap, trailing = cluster[pos:bfo], cluster[bfo + bfs :]
        else:
            gap, trailing = cluster[pos:], b""
        return HeaderArea(
            header=self.header,
            extensions=tuple(self.extensions),
            end_marker=end_marker,
            gap=gap,
            backing_file=backing,
            trailing=trailing,
        )

    def extension(self, magic: int) -> Extension | None:
        """The extension of type *magic* QEMU uses, if any: the last one of that type.

        QEMU reads the extensions in order and each one of a type overrides
        the one before (``qcow2_read_extensions``).
        """
        found = None
        for ext in self.extensions:
            if ext.magic == magic:
                found = ext
        return found

    def feature_names(self) -> dict[tuple[int, int], str]:
        """Feature names by (type, bit): the image's own table over QEMU's defaults."""
        names = dict(DEFAULT_FEATURE_NAMES)
        ext = self.extension(layout.EXT_FEATURE_NAMES)
        if ext is not None:
            for entry in feature_name_entries(ext.data)[0]:
                names[(entry.type, entry.bit)] = entry.name.decode("utf-8", "backslashreplace")
        return names

    @property
    def bitmaps_extension(self) -> BitmapsExtension | None:
        """The bitmaps extension, or None.  Raises if its data is not 24 bytes."""
        ext = self.extension(layout.EXT_BITMAPS)
        if ext is None:
            return None
        if len(ext.data) != layout.BITMAPS_EXTENSION_SIZE:
            raise ImageFormatError(
                f"bitmaps extension has length {len(ext.data)}, it must be "
                f"{layout.BITMAPS_EXTENSION_SIZE}",
                offset=ext.offset + layout.EXTENSION_FIELD.length,
                field="bitmaps extension length",
            )
        return BitmapsExtension.decode(ext.data, offset=ext.data_offset)

    @property
    def bitmaps_honored(self) -> bool:
        """Whether QEMU loads the bitmaps: a v3 image, autoclear bit 0 set, a 24-byte extension."""
        header = self.header
        if header.version < 3 or not header.autoclear & AutoclearFeature.BITMAPS:
            return False
        ext = self.extension(layout.EXT_BITMAPS)
        return ext is not None and len(ext.data) == layout.BITMAPS_EXTENSION_SIZE

    def bitmap_structures(self, *, honored_only: bool = True) -> BitmapStructures | None:
        """The directory, its entries and their tables, as far as they can be read.

        None without a readable directory, and, with *honored_only*, when QEMU
        ignores the extension (autoclear bit 0 clear, a v2 image).
        """
        try:
            ext = self.bitmaps_extension
        except ImageFormatError:
            return None
        if ext is None or (honored_only and not self.bitmaps_honored):
            return None
        directory = self.read_directory()
        if directory.problem == "location" or ext.bitmap_directory_size == 0:
            return None
        return BitmapStructures(
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            ext.offset + layout.BITMAPS_EXTENSION_FIELD.bitmap_directory_offset,
            directory.entries,
            self.read_bitmap_tables(directory.entries),
        )

    # -- bitmap directory ------------------------------------------------------------

    def read_directory(self, *, past_eof_as_zeros: bool = False) -> Directory:
        """Parse the bitmap directory named by the bitmaps extension.

        Structural problems (the directory outside the file, an entry crossing
        its end, a count that disagrees) are returned in ``Directory.error``
        with the entries parsed before them; QEMU's per-entry constraints are
        judged by ``qbitmap.check``.  With *past_eof_as_zeros*, a directory
        that extends past the end of the file is read as QEMU reads it: the
        missing bytes as zeros (still within QEMU's 64 MiB limit).
        """
        ext = self.bitmaps_extension
        if ext is None:
            return Directory(0, 0, ())
        offset, size = ext.bitmap_directory_offset, ext.bitmap_directory_size
        X = layout.BITMAPS_EXTENSION_FIELD
        if size > layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            err = ImageFormatError(
                f"bitmap_directory_size is {size}, QEMU's limit is "
                f"{layout.QCOW2_MAX_BITMAP_DIRECTORY_SIZE}",
                offset=ext.offset + X.bitmap_directory_size,
                field="bitmap_directory_size",
            )
            return Directory(offset, size, (), err, "location")
        if offset + size > self.file_size and not past_eof_as_zeros:
            err = ImageFormatError(
                f"bitmap directory ({size} bytes at {offset:#x}) extends past the end of the "
                f"file ({self.file_size} bytes)",
                offset=ext.offset + X.bitmap_directory_offset,
                field="bitmap_directory_offset",
            )
            return Directory(offset, size, (), err, "location")
        if ext.nb_bitmaps > layout.QCOW2_MAX_BITMAPS:
            err = ImageFormatError(
                f"nb_bitmaps is {ext.nb_bitmaps}, QEMU's limit is {layout.QCOW2_MAX_BITMAPS} "
                "(QEMU: 'File has too many bitmaps')",
                offset=ext.offset + X.nb_bitmaps,
                field="nb_bitmaps",
            )
            return Directory(offset, size, (), err, "location")
        # Read as far as the entries actually reach (in windows), not all the
        # claimed size up front: a lying size then costs nothing.
        data = bytearray()

        def have(end: int) -> None:
            if end > len(data):
                at = offset + len(data)
                want = min(size, max(end, len(data) + DIRECTORY_READ_WINDOW)) - len(data)
                inside = want if not past_eof_as_zeros else max(0, min(want, self.file_size - at))
                if inside:
                    data.extend(
                        self.read(
                            at, inside, what="bitmap directory", field="bitmap_directory_offset"
                        )
                    )
                data.extend(bytes(want - inside))

        E = layout.BITMAP_DIR_ENTRY_FIELD
        entries: list[BitmapEntry] = []
        pos = 0
        error: ImageFormatError | None = None
        problem: str | None = None
        while pos < size:
            if len(entries) == ext.nb_bitmaps:
                # Stop here rather than parse whatever fills the rest: a lying
                # directory size must not turn into millions of entries.
                error = ImageFormatError(
                    f"the bitmap directory continues for {size - pos} bytes after its "
                    f"nb_bitmaps ({ext.nb_bitmaps}) entries (QEMU: 'More bitmaps found than "
                    "specified in header extension')",
                    offset=offset + pos,
                    field="bitmap_directory_size",
                )
                problem = "count"
                break
            entry_offset = offset + pos
            if size - pos < layout.BITMAP_DIR_ENTRY_FIXED_SIZE:
                error = ImageFormatError(
                    f"bitmap directory entry {len(entries)} is cut off by the directory's end "
                    "(QEMU: 'Broken bitmap directory')",
                    offset=entry_offset,
                    field="bitmap directory entry",
                )
                problem = "broken"
                break
            have(pos + layout.BITMAP_DIR_ENTRY_FIXED_SIZE)
            fixed = layout.BitmapDirectoryEntryFixed.parse(data, pos)
            name_size, extra_size = fixed["name_size"], fixed["extra_data_size"]
            full = layout.dir_entry_size(name_size, extra_size)
            if pos + full > size:
                error = ImageFormatError(
                    f"bitmap directory entry {len(entries)} ({full} bytes with name_size "
                    f"{name_size} and extra_data_size {extra_size}) crosses the directory's end "
                    "(QEMU: 'Broken bitmap directory')",
                    offset=entry_offset + E.name_size,
                    field="name_size",
                )
                problem = "broken"
                break
            have(pos + full)
            entries.append(
                BitmapEntry.decode(data[pos : pos + full], offset=entry_offset, index=len(entries))
            )
            pos += full
        if error is None and len(entries) != ext.nb_bitmaps:
            error = ImageFormatError(
                f"the bitmap directory holds {len(entries)} entries, fewer than nb_bitmaps "
                f"{ext.nb_bitmaps} (QEMU: 'Less bitmaps found than specified in header extension')",
                offset=ext.offset + X.nb_bitmaps,
                field="nb_bitmaps",
            )
            problem = "count"
        return Directory(offset, size, tuple(entries), error, problem)

    # -- bitmap tables -----------------------------------------------------------------

    def read_bitmap_table(self, entry: BitmapEntry, *, limit: int | None = None) -> np.ndarray:
        """The bitmap table of *entry* as native uint64 words.

        With *limit*, only the first ``min(limit, bitmap_table_size)`` entries
        are read (the ones a disk of this size uses).  Raises ImageFormatError
        if the table does not lie inside the file or exceeds QEMU's limit of
        2^27 entries.
        """
        count = entry.bitmap_table_size
        if count > layout.BME_MAX_TABLE_SIZE:
            raise ImageFormatError(
                f"bitmap {entry.display_name!r}: bitmap_table_size {count} exceeds QEMU's limit "
                f"{layout.BME_MAX_TABLE_SIZE}",
                offset=entry.offset + layout.BITMAP_DIR_ENTRY_FIELD.bitmap_table_size,
                field="bitmap_table_size",
            )
        if limit is not None:
            count = min(count, max(0, limit))
        data = self.read(
            entry.bitmap_table_offset,
            count * 8,
            what=f"bitmap table of {entry.display_name!r}",
            field="bitmap_table_offset",
        )
        return be64(data)

    def read_bitmap_tables(self, entries: Sequence[BitmapEntry]) -> dict[int, np.ndarray]:
        """The tables of *entries* whose location is sane, by directory index.

        A table must be non-empty, cluster aligned, within QEMU's limits and
        inside the file, and must not overlap a table read before it (the
        overlap is a finding of its own): so the bytes read for tables never
        exceed the file size, whatever the directory claims.
        """
        cs = self.cluster_size
        taken: list[tuple[int, int]] = []
        out: dict[int, np.ndarray] = {}
        for entry in entries:
            off, n = entry.bitmap_table_offset, entry.bitmap_table_size
            if not (
                off
                and off % cs == 0
                and 0 < n <= layout.BME_MAX_TABLE_SIZE
                and n * cs <= layout.BME_MAX_PHYS_SIZE
                and off + n * 8 <= self.file_size
            ):
                continue
            end = off + -(-(n * 8) // cs) * cs
            i = bisect.bisect_right(taken, (off, end))
            if (i and taken[i - 1][1] > off) or (i < len(taken) and taken[i][0] < end):
                continue
            taken.insert(i, (off, end))
            out[entry.index] = self.read_bitmap_table(entry)
        return out

    # -- consistency-level extension ---------------------------------------------------

    def read_levels(self) -> LevelsExtension | None:
        """Parse the qbitmap consistency-level extension, if present."""
        ext = self.extension(layout.EXT_LEVELS)
        if ext is None:
            return None
        return parse_levels_extension(ext.data, offset=ext.data_offset)


def parse_levels_extension(data: bytes, *, offset: int) -> LevelsExtension:
    """Parse the data of a consistency-level extension found at file *offset*."""
    if len(data) < layout.LEVELS_EXTENSION_HEADER_SIZE:
        err = ImageFormatError(
            f"consistency-level extension has {len(data)} bytes of data, at least "
            f"{layout.LEVELS_EXTENSION_HEADER_SIZE} are needed",
            offset=offset,
            field="qbitmap levels extension",
        )
        return LevelsExtension(offset, 0, 0, (), data, err)
    head = layout.LevelsExtensionHeader.parse(data)
    records: list[LevelRecord] = []
    pos = layout.LEVELS_EXTENSION_HEADER_SIZE
    error: ImageFormatError | None = None
    for i in range(head.nb_records):
        if len(data) - pos < layout.LEVEL_RECORD_FIXED_SIZE:
            error = ImageFormatError(
                f"consistency-level record {i} is cut off by the extension's end",
                offset=offset + pos,
                field="nb_records",
            )
            break
        fixed = layout.LevelRecordFixed.parse(data[pos : pos + layout.LEVEL_RECORD_FIXED_SIZE])
        full = layout.level_record_size(fixed.name_size)
        if pos + full > len(data):
            error = ImageFormatError(
                f"consistency-level record {i} (name_size {fixed.name_size}) crosses the "
                "extension's end",
                offset=offset + pos + layout.LEVEL_RECORD_FIELD.name_size,
                field="name_size",
            )
            break
        c = layout.LevelRecord.parse(data[pos : pos + full])
        records.append(LevelRecord.from_container(c, offset=offset + pos))
        pos += full
    return LevelsExtension(offset, head.version, head.nb_records, tuple(records), data[pos:], error)


__all__ = [
    "Directory",
    "Image",
    "LevelsExtension",
    "QbitmapError",
    "parse_bytes",
    "parse_levels_extension",
]
