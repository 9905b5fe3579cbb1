"""Findings of ``qbitmap check``: severities, the finding record and the code registry.

Every finding code lives in :data:`CODES` with its severity and a one-line
description; :class:`Finding` takes its severity from there, so a code can
never be reported with two severities, and ``man/qbitmap-check.1`` is tested
against this one registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbitmap.format import BitmapEntry


class Severity(enum.IntEnum):
    """How bad a finding is; the exit code follows from the worst ones."""

    INFO = 0  # worth showing, changes nothing
    LEAK = 1  # wasted space, no risk to data (exit 3)
    IN_USE = 2  # stale bitmaps with sound metadata, which recover can bring back (exit 4)
    CORRUPT = 3  # metadata damaged, or QEMU would refuse the image (exit 2)
    BUSY = 4  # a running writer holds the image: its bitmaps live in its memory (exit 75)
    FAILED = 5  # the check could not be done (exit 1)

    @property
    def label(self) -> str:
        """The word used in JSON and tables: info, leak, in-use, corrupt, busy, failed."""
        return self.name.lower().replace("_", "-")


I, L, U, C, B, F = (
    Severity.INFO,
    Severity.LEAK,
    Severity.IN_USE,
    Severity.CORRUPT,
    Severity.BUSY,
    Severity.FAILED,
)

# code -> (severity, what it means).  Codes are stable: never rename one.
CODES: dict[str, tuple[Severity, str]] = {
    # -- the check itself -------------------------------------------------------------
    "image-unreadable": (
        F,
        "the file could not be opened or is not a qcow2 image (no qcow2 magic)",
    ),
    "image-read-error": (F, "reading the image failed part way through the check"),
    "image-invalid": (
        C,
        (
            "a qcow2 image whose header (or another structure read to open it) is invalid: "
            "QEMU refuses to open it"
        ),
    ),
    "image-unsupported-feature": (
        C,
        "the image sets incompatible feature bits QEMU does not know: QEMU refuses to open it",
    ),
    # -- the image around the bitmaps --------------------------------------------------
    "image-marked-corrupt": (C, "incompatible feature bit 1 (corrupt) is set: QEMU found damage"),
    "image-dirty": (
        I,
        "incompatible feature bit 0 (dirty) is set: refcounts may lag, so they were not compared",
    ),
    "image-in-use-live": (
        I,
        "another process (normally a QEMU reading the image) holds some of its lock bytes",
    ),
    "image-held-by-writer": (
        B,
        (
            "a running writer (normally QEMU) holds the image: its bitmaps live in its memory, "
            "what is on disk is not their state"
        ),
    ),
    "header-invalid": (C, "a header field has a value QEMU refuses to open"),
    "header-extensions-invalid": (
        C,
        "the header extension area is malformed (QEMU: 'Header extension too large')",
    ),
    "refcount-table-invalid": (
        C,
        "the refcount table is missing, misplaced or too large, so refcounts cannot be read",
    ),
    "refcount-block-invalid": (
        C,
        (
            "a refcount table entry has reserved bits set or points to an unaligned block or one "
            "outside the file, or a refcount block is also used by something else"
        ),
    ),
    "l1-table-invalid": (
        C,
        "the active L1 table is misplaced, too large or too small for the disk",
    ),
    "l1-entry-invalid": (
        C,
        "an L1 entry has reserved bits set, or flags without an L2 table offset",
    ),
    "l2-table-invalid": (C, "an L1 entry points to an unaligned L2 table or one outside the file"),
    "l2-entry-invalid": (
        C,
        (
            "an L2 entry has reserved bits set, an unaligned data offset, a compressed descriptor with "
            "OFLAG_COPIED or subcluster bits, or contradictory subcluster bits"
        ),
    ),
    "image-cluster-past-eof": (
        C,
        "an L2 entry points at guest data (or compressed data) at or past the end of the file",
    ),
    "image-copied-flag-mismatch": (
        C,
        "OFLAG_COPIED of an active L1 or L2 entry disagrees with its cluster's refcount being 1",
    ),
    "image-refcount-overflow": (
        C,
        "a cluster has more references than its refcount width can count",
    ),
    "snapshot-table-invalid": (
        C,
        "the snapshot table or a snapshot's L1 table cannot be read, or an entry is incomplete",
    ),
    "encryption-header-invalid": (
        C,
        "the full disk encryption header pointer is malformed or points outside the file",
    ),
    "image-refcount-too-low": (
        C,
        "clusters outside the bitmaps are referenced more often than their refcount says",
    ),
    "image-clusters-leaked": (
        L,
        (
            "clusters outside the bitmaps have a refcount above their references (leaks; "
            "'qemu-img check -r leaks' frees them)"
        ),
    ),
    "image-clusters-leaked-past-eof": (
        L,
        (
            "clusters past the end of the file have a refcount and no reference (a writer "
            "killed before it wrote them; QEMU's check does not look there, its allocator "
            "skips them; 'qbitmap recover' frees them)"
        ),
    ),
    # -- the bitmaps extension and the directory -----------------------------------------
    "bitmaps-extension-length": (
        C,
        "the bitmaps extension's length is not 24 (QEMU refuses the image)",
    ),
    "bitmaps-extension-reserved": (C, "the bitmaps extension's reserved field is not zero"),
    "bitmaps-extension-duplicate": (C, "the header has more than one bitmaps extension"),
    "bitmaps-count-zero": (C, "the bitmaps extension says nb_bitmaps is 0"),
    "bitmaps-count-too-large": (C, "nb_bitmaps exceeds QEMU's limit of 65535"),
    "bitmaps-autoclear-without-extension": (
        C,
        "autoclear bit 0 (bitmaps) is set but the image has no bitmaps extension",
    ),
    "bitmaps-extension-ignored": (
        U,
        (
            "autoclear bit 0 is clear, so QEMU ignores the bitmaps extension; its clusters are still "
            "the bitmaps' alone, so qbitmap recover can bring them back"
        ),
    ),
    "bitmaps-extension-lost": (
        C,
        (
            "autoclear bit 0 is clear, so QEMU ignores the bitmaps extension, and its structures are "
            "damaged or no longer own their clusters: the bitmaps cannot be brought back"
        ),
    ),
    "bitmaps-extension-v2": (
        C,
        "a version 2 image has a bitmaps extension: QEMU keeps no bitmaps in v2 images, they are lost",
    ),
    "bitmap-ignored": (I, "a bitmap of an ignored bitmaps extension: QEMU treats it as lost"),
    "bitmap-directory-unaligned": (C, "bitmap_directory_offset is not cluster aligned"),
    "bitmap-directory-too-large": (
        C,
        "bitmap_directory_size exceeds QEMU's limit of 67107840 bytes",
    ),
    "bitmap-directory-empty": (C, "bitmap_directory_size is 0"),
    "bitmap-directory-outside-file": (C, "the bitmap directory extends past the end of the file"),
    "bitmap-directory-broken": (
        C,
        "a directory entry crosses the directory's end, or the entries do not fill it exactly",
    ),
    "bitmap-directory-count-mismatch": (
        C,
        "the directory holds more or fewer entries than nb_bitmaps says",
    ),
    # -- one bitmap's directory entry ----------------------------------------------------
    "bitmap-extra-data": (C, "the entry has extra data, which QEMU refuses"),
    "bitmap-table-size-zero": (C, "bitmap_table_size is 0"),
    "bitmap-table-offset-zero": (C, "bitmap_table_offset is 0"),
    "bitmap-table-unaligned": (C, "bitmap_table_offset is not cluster aligned"),
    "bitmap-table-too-large": (C, "bitmap_table_size exceeds QEMU's limit of 134217728 entries"),
    "bitmap-granularity-invalid": (C, "granularity_bits is outside QEMU's range 9..31"),
    "bitmap-flags-reserved": (
        C,
        "flag bits other than in_use and auto are set (QEMU refuses extra_data_compatible too)",
    ),
    "bitmap-name-too-long": (C, "name_size exceeds 1023"),
    "bitmap-name-empty": (
        I,
        "name_size is 0: QEMU loads and stores the bitmap, but no command can name it",
    ),
    "bitmap-name-duplicate": (
        C,
        "two bitmaps have the same name as QEMU reads names (up to the first NUL byte)",
    ),
    "bitmap-name-nul": (
        I,
        "the name contains a NUL byte: QEMU knows the bitmap by the bytes before it",
    ),
    "bitmap-name-nul-unstorable": (
        C,
        (
            "the name contains a NUL byte that makes QEMU's copy of the entry shorter than the "
            "one on disk: a read-write open fails and leaves every bitmap lost"
        ),
    ),
    "bitmap-type-invalid": (C, "the bitmap type is not 1 (dirty tracking)"),
    "bitmap-data-too-large": (
        C,
        "bitmap_table_size times the cluster size exceeds QEMU's 512 MiB limit",
    ),
    "bitmap-table-too-small": (
        C,
        "the table of a bitmap not in use is too small to cover the disk",
    ),
    "bitmap-table-size-mismatch": (
        C,
        "the table of a bitmap not in use does not have exactly the size QEMU expects",
    ),
    "bitmap-disk-size-zero": (
        C,
        (
            "an in-use bitmap of a disk of 0 bytes: QEMU accepts no bitmap table for such a disk, "
            "so the bitmap can never be brought back ('recover --drop-broken' drops it)"
        ),
    ),
    "bitmap-table-size-stale": (
        I,
        (
            "an in-use bitmap's table does not match the disk size (resized while open): only "
            "a full recovery can help"
        ),
    ),
    # -- one bitmap's table and data -------------------------------------------------------
    "bitmap-table-outside-file": (C, "the bitmap table extends past the end of the file"),
    "bitmap-table-entry-reserved": (C, "a bitmap table entry has reserved bits set"),
    "bitmap-table-entry-ones-with-offset": (
        C,
        "a bitmap table entry has both a data cluster offset and the all-ones bit",
    ),
    "bitmap-table-entry-unaligned": (
        C,
        "a bitmap table entry's data offset is not cluster aligned",
    ),
    "bitmap-data-outside-file": (C, "a bitmap data cluster starts past the end of the file"),
    "bitmap-bits-past-end": (C, "bits past the end of the disk are set in the last data cluster"),
    # -- clusters of bitmap structures -----------------------------------------------------------
    "bitmap-cluster-unallocated": (
        C,
        "a bitmap cluster (directory, table or data) has refcount 0, so it may be reused",
    ),
    "bitmap-cluster-overlap": (
        C,
        "a bitmap cluster is also used by other metadata, guest data or another bitmap",
    ),
    "bitmap-cluster-leaked": (L, "a bitmap cluster's refcount is higher than its references"),
    # -- in use ------------------------------------------------------------------------------------
    "bitmap-in-use": (
        U,
        "a writer stopped without closing the bitmap: its contents are stale, see qbitmap recover",
    ),
    "bitmap-in-use-live": (
        I,
        "the bitmap is in use by the process holding the image: expected while it runs",
    ),
    # -- consistency-level records ---------------------------------------------------------------
    "levels-extension-invalid": (
        I,
        "the consistency-level extension cannot be parsed; no record is used",
    ),
    "levels-record-stale": (I, "a consistency-level record exists but may not be trusted"),
    "levels-record-orphan": (I, "a consistency-level record names no bitmap of the image"),
}

del I, L, U, C, B, F

#: How ``recover --drop-broken`` repairs a bitmap with a corrupt finding, by code.
#: Codes not listed make QEMU refuse the bitmap: it is dropped.
#:
#: ``rewrite``: QEMU loads the bitmap without noticing -- its clusters are shared,
#: unallocated or past the end of the file, or bits past the disk's end are set --
#: but its contents cannot be trusted: it is rewritten with every bit set.
#: ``rename``: QEMU loads it under the name before the NUL byte but cannot store the
#: directory back: the entry is rewritten with that name, which QEMU already uses.
REPAIRS: dict[str, str] = {
    "bitmap-cluster-overlap": "rewrite",
    "bitmap-cluster-unallocated": "rewrite",
    "bitmap-table-outside-file": "rewrite",
    "bitmap-data-outside-file": "rewrite",
    "bitmap-bits-past-end": "rewrite",
    "bitmaps-extension-duplicate": "rewrite",
    "bitmap-name-nul-unstorable": "rename",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``check`` found.  The severity comes from :data:`CODES`."""

    code: str  # stable kebab-case slug, listed in man/qbitmap-check.1
    message: str  # one sentence, no trailing period, no markup
    offset: int | None = None  # file offset of the field at fault
    field: str | None = None  # name of that field
    bitmap: str | None = None  # display name of the bitmap concerned
    area: str = "image"  # "image", "bitmaps" (extension/directory) or "bitmap" (one bitmap)
    bitmap_index: int | None = None  # directory position of the bitmap, if any

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}")

    @property
    def severity(self) -> Severity:
        return CODES[self.code][0]

    def sort_key(self) -> tuple[int, int, int, str, str]:
        return (
            -int(self.severity),
            -1 if self.bitmap_index is None else self.bitmap_index,
            -1 if self.offset is None else self.offset,
            self.code,
            self.message,
        )

    @classmethod
    def for_bitmap(
        cls, entry: BitmapEntry, code: str, message: str, offset: int | None, field: str
    ) -> Finding:
        """A finding about one bitmap's entry, table or data (area "bitmap")."""
        return cls(
            code,
            message,
            offset=offset,
            field=field,
            bitmap=entry.display_name,
            area="bitmap",
            bitmap_index=entry.index,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "severity": self.severity.label,
            "bitmap": self.bitmap,
            "offset": self.offset,
            "field": self.field,
            "message": self.message,
        }
