"""qbitmap's public Python API: a thin facade over the format, check, recover and libvirt layers.

Import these names from ``qbitmap`` (``qbitmap.open_image``,
``qbitmap.check``, ...), which loads this module on first use; the
reference, with examples, is ``docs/api.md``.  Everything here only calls
the layers the commands call, in the same way, so that a report is the one
the command's ``--json`` prints:

* :func:`open_image` -> :class:`Image` (read-only, no lock): its
  :class:`Bitmap` s, a bitmap's dirty extents streamed from the file, guest
  data read through the backing chain (``qbitmap dump``);
* :func:`check` -> :class:`CheckReport` (``qbitmap check --json``);
* :func:`recover` -> :class:`RecoverReport` (``qbitmap recover --json``);
* :func:`checkpoints` -> :class:`CheckpointsReport` (``qbitmap checkpoints
  --json DOMAIN``).

Failures are the exceptions of :mod:`qbitmap.errors`, each with its exit
status; nothing here prints, exits or imports click or rich.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from qbitmap.errors import (
    ImageFormatError,
    ImageIOError,
    StaleBitmapError,
    UsageError,
)
from qbitmap.imagefile import require_image_file

if TYPE_CHECKING:
    from qbitmap.format import BitmapEntry
    from qbitmap.format import Image as _FormatImage
    from qbitmap.format.guest import GuestDisk

#: A path as the API takes it.
StrPath = str | os.PathLike[str]

# Extents are handed out from numpy blocks this many at a time: the Python ints of one
# slice are all that exists at once, however many ranges a block holds.
_EXTENT_SLICE = 4096


def _names(bitmaps: Sequence[str] | str | None) -> list[str]:
    """Bitmap names as a list; a lone string is one name, not a sequence of letters."""
    if bitmaps is None:
        return []
    if isinstance(bitmaps, str):
        return [bitmaps]
    return list(bitmaps)


# -- images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bitmap:
    """One persistent bitmap of an image, as its directory entry and data say.

    Attributes:
        name: the name in the directory entry, as ``qbitmap dump`` shows it:
            bytes that are not UTF-8 as ``\\xNN`` escapes, and whatever follows
            a NUL byte (QEMU's name for the bitmap stops there) kept.
            :meth:`Image.bitmap` and :meth:`Image.extents` take it, or
            QEMU's name.
        granularity: guest bytes per bit.
        flags: the flag words ``qemu-img info --output=json`` uses:
            ``"in-use"``, ``"auto"``.
        in_use: flagged in use: its writer did not close it (a crash, or a
            QEMU that has the image open right now).
        recording: the ``auto`` flag: QEMU records every write in it (an
            enabled bitmap); False for a disabled one.
        stale: the on-disk contents miss writes: in use, or the image's
            bitmaps extension is one QEMU ignores (autoclear bit 0 clear, or
            a version 2 image).  :meth:`Image.extents` refuses a stale
            bitmap unless asked.
        dirty_bytes: guest bytes its set bits cover, cut at the disk's end.
    """

    name: str
    granularity: int
    flags: tuple[str, ...]
    in_use: bool
    recording: bool
    stale: bool
    dirty_bytes: int


class Image:
    """A qcow2 image opened read-only by :func:`open_image`; use it as a context manager.

    Takes no lock and writes nothing, so it works on an image a running QEMU
    holds, where what it reads may be changing and in-use bitmaps are stale
    (:meth:`writer_running` tells).  Close it (or leave the ``with`` block)
    after consuming any :meth:`extents` iterator: they read from the open file.
    Once it is closed, every method but :meth:`close` raises ValueError.

    Attributes:
        filename: the path it was opened with, as a string.
        virtual_size: the guest disk's size in bytes.
        cluster_size: the image's cluster size in bytes.
    """

    filename: str
    virtual_size: int
    cluster_size: int

    def __init__(self, image: _FormatImage) -> None:
        self._image = image
        self._guest: GuestDisk | None = None
        self._bitmaps: tuple[Bitmap, ...] | None = None
        self.filename = str(image.path)
        self.virtual_size = image.virtual_size
        self.cluster_size = image.cluster_size

    def _open(self) -> _FormatImage:
        """The open image; ValueError once closed (as for a closed Python file)."""
        if self._image.fd < 0:
            raise ValueError(f"{self.filename}: the image is closed")
        return self._image

    def __repr__(self) -> str:
        state = "closed" if self._image.fd < 0 else "open"
        return f"<qbitmap.Image {self.filename!r} {state}>"

    # -- bitmaps ----------------------------------------------------------------------------

    @property
    def bitmaps(self) -> tuple[Bitmap, ...]:
        """Every bitmap, in directory order (read once, on first use).

        Reads each bitmap's data to count its dirty bytes, as ``qbitmap dump``
        does.

        Raises:
            ImageFormatError: the bitmaps extension, the directory, a bitmap
                table or data cluster cannot be read (the offset and field
                are attributes of the exception).
            ImageIOError: the operating system refused a read.
        """
        self._open()
        if self._bitmaps is None:
            self._bitmaps = tuple(self._bitmap(entry) for entry in self._entries())
        return self._bitmaps

    def bitmap(self, name: str) -> Bitmap:
        """The bitmap called *name* (QEMU's name for it, or :attr:`Bitmap.name`).

        Raises:
            UsageError: the image has no bitmap of that name.
            ImageFormatError, ImageIOError: as for :attr:`bitmaps`.
        """
        return self._bitmap(self._entry(name))

    def extents(self, name: str, *, allow_stale: bool = False) -> Iterator[tuple[int, int]]:
        """The dirty guest byte ranges of bitmap *name*, as ``(start, length)`` tuples.

        Sorted, merged and cut at the disk's end, as ``qbitmap dump
        --extents`` lists them.  They stream from the open image: memory
        stays flat however many ranges the bitmap has.  The bitmap's table
        and data are read through once before this returns, so a damaged
        bitmap raises here, before the first range is handed out.

        Args:
            name: the bitmap: QEMU's name for it, or :attr:`Bitmap.name`.
            allow_stale: hand out a stale bitmap's on-disk ranges too (they
                miss the writes made since its writer last closed it).

        Raises:
            UsageError: the image has no bitmap of that name.
            StaleBitmapError: the bitmap is stale (see :attr:`Bitmap.stale`)
                and *allow_stale* is False.
            ImageFormatError, ImageIOError: as for :attr:`bitmaps`.
        """
        from qbitmap.format import extent_blocks, geometry_of, iter_chunks

        entry = self._entry(name)
        bitmap = self._bitmap(entry)
        if bitmap.stale and not allow_stale:
            why = (
                "is in use: its writer did not close it"
                if bitmap.in_use
                else "is in an extension QEMU ignores (autoclear bit 0 is clear)"
            )
            raise StaleBitmapError(
                f"{self.filename}: bitmap {bitmap.name!r} {why}, so its on-disk ranges miss "
                "the writes made since; 'qbitmap recover' brings it back into service"
            )
        blocks = extent_blocks(geometry_of(self._image, entry), iter_chunks(self._image, entry))
        return _extents(blocks, self._open)

    def _entries(self) -> tuple[BitmapEntry, ...]:
        """The directory's entries, or the error that keeps ``qbitmap dump`` from reading them."""
        image = self._open()
        if image.extension_error is not None:
            raise image.extension_error
        directory = image.read_directory()
        if directory.error is not None:
            raise directory.error
        return tuple(directory.entries)

    def _entry(self, name: str) -> BitmapEntry:
        from qbitmap.format import select_entries

        entries = self._entries()
        chosen, _ = select_entries(entries, [name])
        if not chosen:
            # A name QEMU cuts at a NUL, or one that is not UTF-8, as Bitmap.name spells it.
            chosen = [e for e in entries if e.display_name == name]
        if not chosen:
            raise UsageError(f"{self.filename}: no bitmap named {name!r}")
        if len(chosen) > 1:
            raise ImageFormatError(
                f"{self.filename}: {len(chosen)} bitmaps are named {name!r}; QEMU refuses "
                "such an image",
                offset=chosen[1].offset,
                field="name",
            )
        return chosen[0]

    def _bitmap(self, entry: BitmapEntry) -> Bitmap:
        from qbitmap.format import dirty_bytes, geometry_of, iter_chunks
        from qbitmap.inspect import bitmap_summary

        image = self._image
        summary = bitmap_summary(entry, extension_consistent=image.bitmaps_honored)
        flags = tuple(summary["flags"])
        return Bitmap(
            name=summary["name"],
            granularity=summary["granularity"],
            flags=flags,
            in_use=summary["in_use"],
            recording="auto" in flags,
            stale=summary["stale"],
            dirty_bytes=dirty_bytes(geometry_of(image, entry), iter_chunks(image, entry)),
        )

    # -- guest data ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)``, read through the backing chain.

        What the guest sees: data clusters, zero clusters and unallocated
        ones (from the backing file, or zeros below the last layer),
        compressed clusters decompressed.  Read large ranges in pieces: the
        result is one ``bytes`` object.

        Raises:
            UsageError: the range is not inside the disk (negative offset or
                length, or past :attr:`virtual_size`).
            UnsupportedImageError: guest data qbitmap cannot read (encryption,
                an external data file, a backing name that is not a plain
                file name).
            ImageFormatError: an L1/L2 table or a compressed cluster is
                damaged, or a backing file cannot be read.
            ImageIOError: the operating system refused a read.
        """
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"{self.filename}: guest range {offset}+{length} is not inside the disk "
                f"({self.virtual_size} bytes)"
            )
        self._open()
        if self._guest is None:
            from qbitmap.format.guest import GuestDisk

            self._guest = GuestDisk(self.filename, fmt="qcow2")
        return self._guest.read(offset, length)

    # -- the image's state ------------------------------------------------------------------

    def writer_running(self) -> bool:
        """Whether a running process (normally QEMU) holds the image for writing, right now.

        Tests QEMU's lock bytes without taking any.  While a writer runs, its
        bitmaps live in its memory: what is on disk is not their state.
        """
        from qbitmap import lockbytes

        return lockbytes.writer_present(lockbytes.probe(self._open().fd))

    def close(self) -> None:
        """Close the image and every file of its backing chain opened for :meth:`read`."""
        if self._guest is not None:
            self._guest.close()
            self._guest = None
        self._image.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _extents(
    blocks: Iterator[tuple[Any, Any]], still_open: Callable[[], object]
) -> Iterator[tuple[int, int]]:
    while True:
        still_open()  # before the next block is read from the file
        block = next(blocks, None)
        if block is None:
            return
        starts, lengths = block
        for at in range(0, len(starts), _EXTENT_SLICE):
            part = zip(
                starts[at : at + _EXTENT_SLICE].tolist(),
                lengths[at : at + _EXTENT_SLICE].tolist(),
                strict=True,
            )
            yield from part


def open_image(path: StrPath) -> Image:
    """Open the qcow2 image *path* read-only, taking no lock.

    Raises:
        ImageIOError: it cannot be opened, or is not a regular file or a
            block device (a FIFO, a directory).
        ImageFormatError: it is not a qcow2 image, or its header is damaged.
        UnsupportedImageError: a qcow2 image qbitmap does not read.
    """
    from qbitmap.format import Image as FormatImage

    path = Path(path)
    require_image_file(path)
    return Image(FormatImage.open(path))


# -- check ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing :func:`check` (or :func:`recover`) found, as ``check --json`` lists it.

    Attributes:
        code: a stable code, listed in ``man/qbitmap-check.1``.
        severity: ``info``, ``leak``, ``in-use``, ``corrupt``, ``busy`` or
            ``failed``.
        message: one sentence.
        bitmap: the bitmap concerned, if any.
        offset: the file offset of the field at fault, if any.
        field: that field's name, if any.
    """

    code: str
    severity: str
    message: str
    bitmap: str | None
    offset: int | None
    field: str | None

    @classmethod
    def _of(cls, d: Mapping[str, Any]) -> Finding:
        return cls(d["code"], d["severity"], d["message"], d["bitmap"], d["offset"], d["field"])


@dataclass(frozen=True)
class BitmapCheck:
    """The verdict of :func:`check` on one bitmap.

    Attributes:
        name: the bitmap's name.
        status: ``consistent``, ``in-use``, ``corrupt`` or ``ignored`` (in an
            extension QEMU ignores).
        levels: its consistency-level record as ``check --json`` reports it
            (``status``, ``consistent_level``, ...), or None.
    """

    name: str
    status: str
    levels: Mapping[str, Any] | None


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check` found: the report ``qbitmap check --json`` prints.

    Attributes:
        filename: the image.
        exit_code: ``check``'s exit status: the first of 1 (could not
            check), 75 (a running writer holds the image), 2 (corrupt), 4
            (stale bitmaps ``recover`` can bring back), 3 (leaks only) that
            applies, else 0.  Compare with :class:`ExitCode`.
        error: why the image could not be checked (exit status 1), or None.
        findings: every finding, worst first.
        bitmaps: every bitmap's verdict, in directory order.
    """

    filename: str
    exit_code: int
    error: str | None
    findings: tuple[Finding, ...]
    bitmaps: tuple[BitmapCheck, ...]
    _document: Mapping[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``qbitmap check --json`` prints for the same image (a fresh copy)."""
        return copy.deepcopy(dict(self._document))

    @classmethod
    def _of(cls, d: Mapping[str, Any]) -> CheckReport:
        return cls(
            filename=d["filename"],
            exit_code=d["exit_code"],
            error=d["error"],
            findings=tuple(Finding._of(f) for f in d["findings"]),
            bitmaps=tuple(BitmapCheck(b["name"], b["status"], b["levels"]) for b in d["bitmaps"]),
            _document=copy.deepcopy(dict(d)),
        )


def check(path: StrPath, *, bitmaps: Sequence[str] | str | None = None) -> CheckReport:
    """Check the bitmaps of the qcow2 image *path*, as ``qbitmap check`` does.

    Reads only and takes no lock.  Every problem with the image is in the
    report, not an exception: a file that cannot be read or is not a qcow2
    image is a report with ``exit_code`` 1 and its ``error``.

    Args:
        path: the image.
        bitmaps: report only these bitmaps (image-wide findings are always
            reported); default every bitmap.

    Raises:
        UsageError: a name in *bitmaps* the image does not have.
    """
    from qbitmap.check import CheckReport as Report
    from qbitmap.check import Finding as CheckFinding
    from qbitmap.check import check_path
    from qbitmap.render.check import to_json

    path = Path(path)
    try:
        require_image_file(path)
    except ImageIOError as exc:
        report = Report(str(path), [CheckFinding("image-unreadable", str(exc))])
    else:
        report = check_path(path, names=_names(bitmaps) or None)
    return CheckReport._of(to_json(report))


# -- recover --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapRecovery:
    """What :func:`recover` did, or would do, to one bitmap.

    Attributes:
        name: the bitmap's name.
        action: ``recovered``, ``dropped``, ``renamed`` or ``skipped``.
        mode: ``full``, ``reference`` or ``level``; None when not recovered.
        reason: why (for a skipped or dropped bitmap), or None.
        dirty_bytes_before: dirty bytes of the stale on-disk contents.
        dirty_bytes_after: dirty bytes of the recovered bitmap.
    """

    name: str
    action: str
    mode: str | None
    reason: str | None
    dirty_bytes_before: int | None
    dirty_bytes_after: int | None


@dataclass(frozen=True)
class RecoverReport:
    """What :func:`recover` did: the report ``qbitmap recover --json`` prints.

    Attributes:
        filename: the image.
        dry_run: nothing was written; the report says what a real run writes.
        status: ``recovered``, ``leaks-reclaimed``, ``nothing-to-do`` or
            ``dry-run``.
        exit_code: 0 (a run that fails raises instead).
        bitmaps: each bitmap concerned, in directory order.
        findings: what the check before the run found (``info`` and worse).
        warnings: things the command prints on stderr (not in the JSON).
    """

    filename: str
    dry_run: bool
    status: str
    exit_code: int
    bitmaps: tuple[BitmapRecovery, ...]
    findings: tuple[Finding, ...]
    warnings: tuple[str, ...]
    _document: Mapping[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``qbitmap recover --json`` prints for the same run (a fresh copy).

        Beyond the attributes: the reference comparison's counts, leaked
        clusters freed, clusters allocated and freed, and every write in order
        (``steps``, ``writes``), as ``man/qbitmap-recover.1`` describes them.
        """
        return copy.deepcopy(dict(self._document))

    @classmethod
    def _of(cls, d: Mapping[str, Any], warnings: Sequence[str]) -> RecoverReport:
        return cls(
            filename=d["filename"],
            dry_run=d["dry_run"],
            status=d["status"],
            exit_code=d["exit_code"],
            bitmaps=tuple(
                BitmapRecovery(
                    b["name"],
                    b["action"],
                    b["mode"],
                    b["reason"],
                    b["dirty_bytes_before"],
                    b["dirty_bytes_after"],
                )
                for b in d["bitmaps"]
            ),
            findings=tuple(Finding._of(f) for f in d["findings"]),
            warnings=tuple(warnings),
            _document=copy.deepcopy(dict(d)),
        )


def recover(
    path: StrPath,
    *,
    mode: str = "auto",
    reference: StrPath | None = None,
    reference_format: str | None = None,
    bitmaps: Sequence[str] | str | None = None,
    drop_broken: bool = False,
    reclaim_leaks: bool = True,
    dry_run: bool = False,
) -> RecoverReport:
    """Bring the stale bitmaps of *path* back into service, as ``qbitmap recover`` does.

    Holds QEMU's lock bytes for the whole run; every write is crash-safe
    (see ``man/qbitmap-recover.1``).  With *dry_run* nothing is written and
    the report lists the writes a real run makes.

    Args:
        path: the qcow2 image.
        mode: ``auto`` (a trusted consistency-level record, else the
            *reference*, else refuse), ``full`` (every bit set),
            ``reference`` (on-disk bits plus every granule that differs from
            *reference*) or ``level``.
        reference: the guest data as of the bitmap's last clear point (the
            last backup), raw or qcow2.
        reference_format: ``raw`` or ``qcow2`` (default: probed).
        bitmaps: recover only these bitmaps (default: every stale one).
        drop_broken: remove bitmaps whose metadata is corrupt, freeing only
            clusters they alone own.
        reclaim_leaks: free leaked clusters (``--keep-leaks`` is False here).
        dry_run: write nothing.

    Raises:
        ImageBusyError: another process (normally QEMU) holds the image;
            nothing written.
        RefusedError: metadata outside the bitmaps, or a bitmap's own
            (without *drop_broken*), is corrupt; nothing written.
        NoModeError: no mode applies to a bitmap (choose ``full``, a
            *reference* or ``level``); nothing written.
        UsageError: a bad combination of arguments, an unknown bitmap name,
            or a reference that is the image itself; nothing written.
        ImageIOError: a file cannot be opened or read, or a write failed.
        ImageFormatError, UnsupportedImageError: the image or the reference
            cannot be read.
    """
    from qbitmap.recover import MODES, Options
    from qbitmap.recover import recover as run
    from qbitmap.render.recover import to_json

    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if reference_format is not None and reference is None:
        raise UsageError("reference_format needs a reference")
    if reference_format not in (None, "raw", "qcow2"):
        raise UsageError(f"reference_format is {reference_format!r}: raw or qcow2")
    path = Path(path)
    reference = None if reference is None else Path(reference)
    require_image_file(path)
    if reference is not None:
        require_image_file(reference)
    options = Options(
        names=tuple(_names(bitmaps)),
        mode=mode,
        reference=reference,
        reference_format=reference_format,
        drop_broken=drop_broken,
        dry_run=dry_run,
        reclaim_leaks=reclaim_leaks,
    )
    warnings: list[str] = []
    report = run(path, options, warn=warnings.append)
    return RecoverReport._of(to_json(report), warnings)


# -- libvirt checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointDisk:
    """Whether libvirt accepts one checkpoint for one disk, and why not.

    Attributes:
        disk: the disk's target (``vda``).
        bitmap: the bitmap libvirt looks up: the checkpoint's name.
        verdict: ``ok``, ``in-use``, ``missing``, ``gap``, ``not-recording``,
            ``corrupt``, ``unreadable``, or, when not judged, ``running``,
            ``not-checkable`` or ``disk-gone``.
        reason: one sentence.
        repairable: every problem can be repaired in place.
    """

    disk: str
    bitmap: str
    verdict: str
    reason: str
    repairable: bool


@dataclass(frozen=True)
class Checkpoint:
    """One libvirt checkpoint of the domain with its verdict per disk.

    Attributes:
        name: the checkpoint's name.
        parent: its parent's name, or None.
        verdict: the worst of its disks' verdicts.
        disks: the verdict per disk.
    """

    name: str
    parent: str | None
    verdict: str
    disks: tuple[CheckpointDisk, ...]


@dataclass(frozen=True)
class CheckpointsReport:
    """libvirt's checkpoints of one domain: the report ``qbitmap checkpoints --json`` prints.

    Attributes:
        domain: the domain's name.
        running: a writer holds a disk: the domain is running, and its
            checkpoints are not judged (libvirt's own view is authoritative).
        exit_code: 0 every checkpoint usable, 1 something could not be read,
            2 some checkpoint unusable and not repairable here, 4 every
            problem repairable, 75 running; the first of 1, 75, 2, 4 wins.
        checkpoints: every checkpoint, oldest first.
        remedies: the command lines that remedy the problems, in order.
        errors: libvirt files that could not be read, one sentence each.
    """

    domain: str
    running: bool
    exit_code: int
    checkpoints: tuple[Checkpoint, ...]
    remedies: tuple[str, ...]
    errors: tuple[str, ...]
    _document: Mapping[str, Any] = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``qbitmap checkpoints --json DOMAIN`` prints (a fresh copy).

        Beyond the attributes: each disk's backing chain, the bitmaps no
        checkpoint names (``orphans``) and each remedy's note, as
        ``man/qbitmap-checkpoints.1`` describes them.
        """
        return copy.deepcopy(dict(self._document))

    @classmethod
    def _of(cls, d: Mapping[str, Any]) -> CheckpointsReport:
        return cls(
            domain=d["domain"],
            running=d["running"],
            exit_code=d["exit_code"],
            checkpoints=tuple(
                Checkpoint(
                    c["name"],
                    c["parent"],
                    c["verdict"],
                    tuple(
                        CheckpointDisk(
                            v["disk"], v["bitmap"], v["verdict"], v["reason"], v["repairable"]
                        )
                        for v in c["disks"]
                    ),
                )
                for c in d["checkpoints"]
            ),
            remedies=tuple(r["command"] for r in d["remedies"]),
            errors=tuple(f["message"] for f in d["findings"]),
            _document=copy.deepcopy(dict(d)),
        )


def _domain_name(name: str) -> str:
    # The name becomes a file name in two directories.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"{name!r} is not a domain name")
    return name


def checkpoints(
    domain: str | None = None,
    *,
    domain_xml: StrPath | None = None,
    config_dir: StrPath = "/etc/libvirt/qemu",
    checkpoint_dir: StrPath = "/var/lib/libvirt/qemu/checkpoint",
) -> CheckpointsReport:
    """libvirt's view of *domain*'s checkpoints, offline, as ``qbitmap checkpoints`` gives it.

    Reads libvirt's files (the domain's persistent definition in
    *config_dir*, or *domain_xml*; its checkpoints in *checkpoint_dir*) and
    every layer of every disk's backing chain; never writes.  A domain
    definition that cannot be parsed is a report with ``exit_code`` 1 and
    its ``errors``, not an exception.

    Args:
        domain: the domain's name (optional with *domain_xml*).
        domain_xml: a domain definition file (``virsh dumpxml`` output) to
            read instead of *config_dir*'s.
        config_dir: where libvirt keeps persistent domain definitions.
        checkpoint_dir: where it keeps checkpoint metadata (``DIR/DOMAIN/``).

    Raises:
        UsageError: neither *domain* nor *domain_xml*; a name that cannot be
            a domain's; no such domain in *config_dir*; *domain_xml* defines
            another domain.
        ImageIOError: *config_dir* is not a directory.
    """
    from qbitmap.libvirt import (
        DomainReport,
        XmlProblem,
        examine_domain,
        examine_domain_files,
        read_domain,
    )
    from qbitmap.libvirt import Finding as LibvirtFinding

    config_dir = Path(config_dir)
    checkpoint_dir = Path(checkpoint_dir)
    if domain is None and domain_xml is None:
        raise UsageError("name a domain, or give domain_xml")
    if domain is not None:
        _domain_name(domain)
    if domain_xml is not None:
        domain_xml = Path(domain_xml)
        try:
            definition = read_domain(domain_xml)
        except XmlProblem as exc:
            report = DomainReport(domain or domain_xml.stem, str(domain_xml), "-")
            report.findings.append(LibvirtFinding(exc.path, str(exc)))
            return CheckpointsReport._of(report.to_dict())
        if domain is not None and definition.name != domain:
            raise UsageError(f"{domain_xml} defines domain {definition.name!r}, not {domain!r}")
        _domain_name(definition.name)
        found = examine_domain(definition, checkpoint_dir=checkpoint_dir)
        return CheckpointsReport._of(found.to_dict())
    assert domain is not None
    if not config_dir.is_dir():
        raise ImageIOError(
            f"{config_dir}: no such directory (is this a libvirt host? see config_dir)"
        )
    path = config_dir / f"{domain}.xml"
    if not path.exists():
        raise UsageError(f"no domain named {domain!r} is defined (no {path})")
    (found,) = examine_domain_files([path], checkpoint_dir=checkpoint_dir)
    return CheckpointsReport._of(found.to_dict())
