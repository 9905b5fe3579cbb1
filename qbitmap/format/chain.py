"""Backing chains: an image and every image below it, found the way QEMU finds them.

:func:`open_chain` starts at a qcow2 image and follows each layer's backing
file name down to the bottom of the chain:

* the name is the header's ``backing_file_offset``/``backing_file_size``
  bytes (docs/interop/qcow2.rst "Header"; QEMU refuses a name longer than
  1023 bytes or one that leaves the first cluster, and an empty name means
  no backing file);
* a relative name is resolved against the directory of the image that
  names it, as given (QEMU's ``path_combine``: ``dir/top.qcow2`` naming
  ``base.qcow2`` means ``dir/base.qcow2``; symbolic links are not resolved
  first);
* a name with a protocol prefix (a ``:`` before the first ``/``, QEMU's
  ``path_has_protocol``) is not a local file: ``file:`` is stripped, as
  QEMU's file driver does, and every other prefix (``json:``, ``nbd:``,
  ``rbd:``, ...) ends the walk with a :class:`ChainError`;
* the layer's format comes from the referring image's backing format
  extension, else from the file's first bytes (qcow2 magic, else raw);
* a raw layer is the bottom; a layer in another format ends the walk.

Nothing here writes.  The qcow2 layers stay open (read-only, no lock) until
:meth:`BackingChain.close`, so that ``check`` and ``dump`` read each image
once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from qbitmap.errors import ImageFormatError, ImageIOError, QbitmapError
from qbitmap.format import layout
from qbitmap.format.image import Image, open_image_file

#: Deepest chain followed (a loop is reported as such before this is reached).
MAX_CHAIN_DEPTH = 64
#: QEMU's limit on a backing file name (block/qcow2.c: "Backing file name too long").
MAX_BACKING_NAME_SIZE = 1023
#: Formats whose layers are read: qcow2 for bitmaps, raw as a plain bottom layer.
READ_FORMATS = ("qcow2", "raw")


@dataclass(frozen=True)
class ChainLayer:
    """One image of a backing chain."""

    index: int  # 0 is the top image; the backing file of layer i is layer i + 1
    path: Path  # the file, as QEMU opens it
    format: str  # "qcow2", "raw", or the other format named by the referring image
    #: How the format was learnt: "top" (the image asked for), "extension" (the
    #: referring image's backing format extension) or "probed" (first bytes).
    format_source: str
    #: This layer's own backing file name as written in its header (None: the bottom).
    backing_name: str | None = None
    #: The format its backing format extension names, if it has one.
    backing_format: str | None = None
    #: Guest size in bytes: the qcow2 header's size; a raw file's length.
    virtual_size: int | None = None
    #: qcow2 cluster size in bytes (None for other formats).
    cluster_size: int | None = None
    #: qcow2 version (2 or 3; None for other formats).
    qcow2_version: int | None = None

    @property
    def filename(self) -> str:
        return os.fsdecode(self.path)


@dataclass(frozen=True)
class ChainError:
    """Why the walk stopped before the bottom of the chain."""

    #: "protocol" (json: or a network protocol), "missing" (cannot be opened),
    #: "unreadable" (opened, but not an image of the format named), "loop",
    #: "too-deep", "format" (a format qbitmap does not read), "name" (the
    #: backing file name itself is malformed).
    kind: str
    message: str  # one sentence naming the referring image and the name
    referrer: Path  # the image whose backing file could not be followed
    name: str | None  # the backing file name as written (None: the name could not be read)

    def __str__(self) -> str:
        return self.message


@dataclass
class BackingChain:
    """The layers of a chain, top first, with the qcow2 ones open."""

    layers: list[ChainLayer] = field(default_factory=list)
    images: dict[int, Image] = field(default_factory=dict)  # layer index -> open qcow2 image
    error: ChainError | None = None

    @property
    def top(self) -> Image:
        return self.images[0]

    @property
    def complete(self) -> bool:
        """Whether the walk reached the bottom of the chain."""
        return self.error is None

    def close(self) -> None:
        for image in self.images.values():
            image.close()
        self.images.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def shown(name: str) -> str:
    """A file name from an image, quoted and with unprintable characters escaped."""
    return repr(name)


def protocol_of(name: str) -> str | None:
    """The protocol prefix QEMU sees in *name* (``json``, ``nbd``, ``file``, ...), or None.

    QEMU's ``path_has_protocol``: a ``:`` before the first ``/``.
    """
    head = name.split("/", 1)[0]
    if ":" not in head:
        return None
    return head.split(":", 1)[0]


def resolve_backing_name(referrer: Path, name: str) -> Path:
    """The file QEMU opens for backing file *name* of image *referrer* (a local name)."""
    name = name.removeprefix("file:")
    if os.path.isabs(name):
        return Path(name)
    return referrer.parent / name


def read_backing_name(image: Image) -> str | None:
    """The backing file name of *image* as written (None when it has none).

    Raises ImageFormatError for a name QEMU refuses: longer than 1023 bytes
    or not inside the first cluster.
    """
    header = image.header
    offset, size = header.backing_file_offset, header.backing_file_size
    if not offset:
        return None
    if size > MAX_BACKING_NAME_SIZE or offset + size > image.cluster_size:
        raise ImageFormatError(
            f"{image.path}: backing file name of {size} bytes at {offset:#x} is longer than "
            f"QEMU accepts ({MAX_BACKING_NAME_SIZE} bytes, inside the first cluster)",
            offset=16,
            field="backing_file_size",
        )
    raw = image.read(offset, size, what="backing file name", field="backing_file_offset")
    if not raw:
        return None
    return os.fsdecode(raw)


def backing_format_of(image: Image) -> str | None:
    """The format named by the image's backing format extension, if any."""
    ext = image.extension(layout.EXT_BACKING_FORMAT)
    if ext is None:
        return None
    return ext.data.split(b"\0", 1)[0].decode("ascii", "backslashreplace")


def require_image_file(path: Path) -> None:
    """Raise ImageIOError unless *path* is a regular file or a block device.

    Checked before opening: opening a FIFO for reading would wait for a writer.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot open: {exc.strerror}") from exc
    if stat.S_ISDIR(mode):
        raise ImageIOError(f"{path}: is a directory, not an image")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ImageIOError(f"{path}: not a regular file or block device")


def _probe_format(path: Path) -> str:
    fd = open_image_file(path)
    try:
        return "qcow2" if os.pread(fd, len(layout.MAGIC), 0) == layout.MAGIC else "raw"
    finally:
        os.close(fd)


def _file_identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    size = st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = open_image_file(path)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return st.st_dev, st.st_ino, size


def open_chain(path: str | os.PathLike[str], *, max_depth: int = MAX_CHAIN_DEPTH) -> BackingChain:
    """Open the qcow2 image *path* and every layer below it, read-only.

    Errors opening *path* itself are raised as ``Image.open`` raises them.
    A layer below that cannot be followed ends the walk: the layers found so
    far are returned with :attr:`BackingChain.error` saying why.
    """
    top_path = Path(path)
    require_image_file(top_path)
    top = Image.open(top_path)
    chain = BackingChain()
    chain.images[0] = top
    try:
        _walk(chain, top_path, top, max_depth)
    except BaseException:
        chain.close()
        raise
    return chain


def _walk(chain: BackingChain, top_path: Path, top: Image, max_depth: int) -> None:
    top_stat = os.fstat(top.fd)
    seen = {(top_stat.st_dev, top_stat.st_ino)}
    image: Image | None = top
    path, fmt, source = top_path, "qcow2", "top"
    size: int | None = top.virtual_size
    index = 0
    while True:
        backing_name = backing_format = None
        next_error: ChainError | None = None
        if image is not None:
            backing_format = backing_format_of(image)
            try:
                backing_name = read_backing_name(image)
            except QbitmapError as exc:
                next_error = ChainError("name", str(exc), path, None)
        chain.layers.append(
            ChainLayer(
                index=index,
                path=path,
                format=fmt,
                format_source=source,
                backing_name=backing_name,
                backing_format=backing_format,
                virtual_size=size,
                cluster_size=None if image is None else image.cluster_size,
                qcow2_version=None if image is None else image.header.version,
            )
        )
        if next_error is not None:
            chain.error = next_error
            return
        if fmt not in READ_FORMATS:
            chain.error = ChainError(
                "format",
                f"{path}: a {fmt} layer; qbitmap reads only qcow2 and raw layers, so the "
                "chain below it is not examined",
                path,
                None,
            )
            return
        if backing_name is None:
            return
        referrer = path
        protocol = protocol_of(backing_name)
        if protocol is not None and protocol != "file":
            chain.error = ChainError(
                "protocol",
                f"{referrer}: backing file {shown(backing_name)} is not a local file name "
                f"({protocol}: names are not followed; qbitmap reads local files only)",
                referrer,
                backing_name,
            )
            return
        if index + 1 >= max_depth:
            chain.error = ChainError(
                "too-deep",
                f"{referrer}: the backing chain is deeper than {max_depth} images",
                referrer,
                backing_name,
            )
            return
        path = resolve_backing_name(referrer, backing_name)
        try:
            require_image_file(path)
        except QbitmapError as exc:
            chain.error = ChainError(
                "missing",
                f"{referrer}: backing file {shown(backing_name)} cannot be used: {exc}",
                referrer,
                backing_name,
            )
            return
        try:
            dev, ino, file_size = _file_identity(path)
            if (dev, ino) in seen:
                chain.error = ChainError(
                    "loop",
                    f"{referrer}: backing file {shown(backing_name)} ({path}) is an image "
                    "already in this chain (a loop)",
                    referrer,
                    backing_name,
                )
                return
            seen.add((dev, ino))
            if backing_format is not None:
                fmt, source = backing_format, "extension"
            else:
                fmt, source = _probe_format(path), "probed"
        except OSError as exc:
            chain.error = ChainError(
                "missing",
                f"{referrer}: backing file {shown(backing_name)} ({path}) cannot be opened: "
                f"{exc.strerror}",
                referrer,
                backing_name,
            )
            return
        index += 1
        image = None
        size = file_size if fmt == "raw" else None
        if fmt == "qcow2":
            try:
                image = Image.open(path)
            except QbitmapError as exc:
                chain.error = ChainError(
                    "unreadable",
                    f"{referrer}: backing file {shown(backing_name)} ({path}) is not a qcow2 "
                    f"image qbitmap can read: {exc}",
                    referrer,
                    backing_name,
                )
                return
            chain.images[index] = image
            size = image.virtual_size


__all__ = [
    "MAX_BACKING_NAME_SIZE",
    "MAX_CHAIN_DEPTH",
    "BackingChain",
    "ChainError",
    "ChainLayer",
    "backing_format_of",
    "open_chain",
    "protocol_of",
    "read_backing_name",
    "require_image_file",
    "resolve_backing_name",
]
