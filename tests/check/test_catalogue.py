"""The corruption catalogue: one real QEMU image per rule, one field changed.

For every named edit of ``corrupt.py`` the exact finding code and exit status
of ``qbitmap check`` are pinned.  Each case is cross-checked against QEMU:
when ``qemu-img info`` refuses the edited image, check must exit 2 (or 1 for
the two "cannot check at all" cases); when check calls the bitmaps usable
(exit 0, 3 or 4), QEMU must be able to open the image.
"""

from __future__ import annotations

import corrupt
import pytest
import qemu
from checkrun import run_check

# edit -> (finding code that must be reported, exit status)
CATALOGUE: dict[str, tuple[str, int]] = {
    # QEMU's checks on the extension (qcow2_read_extensions)
    "ext-length-16": ("bitmaps-extension-length", 2),
    "ext-reserved": ("bitmaps-extension-reserved", 2),
    "nb-bitmaps-zero": ("bitmaps-count-zero", 2),
    "nb-bitmaps-65536": ("bitmaps-count-too-large", 2),
    "dir-offset-unaligned": ("bitmap-directory-unaligned", 2),
    "dir-size-64mib": ("bitmap-directory-too-large", 2),
    # bitmap_list_load
    "dir-size-zero": ("bitmap-directory-empty", 2),
    "dir-size-short": ("bitmap-directory-broken", 2),
    "nb-bitmaps-one-less": ("bitmap-directory-count-mismatch", 2),
    "nb-bitmaps-one-more": ("bitmap-directory-count-mismatch", 2),
    "extra-data": ("bitmap-extra-data", 2),
    # check_dir_entry
    "table-size-zero": ("bitmap-table-size-zero", 2),
    "table-offset-zero": ("bitmap-table-offset-zero", 2),
    "table-offset-unaligned": ("bitmap-table-unaligned", 2),
    "table-size-2^27+1": ("bitmap-table-too-large", 2),
    "granularity-8": ("bitmap-granularity-invalid", 2),
    "granularity-32": ("bitmap-granularity-invalid", 2),
    "flag-extra-data-compatible": ("bitmap-flags-reserved", 2),
    "flag-bit-8": ("bitmap-flags-reserved", 2),
    "name-1024-bytes": ("bitmap-name-too-long", 2),
    "type-2": ("bitmap-type-invalid", 2),
    "table-size-8193": ("bitmap-data-too-large", 2),
    "disk-grown-300mib": ("bitmap-table-too-small", 2),
    # bitmap_table_load / check_table_entry, load_bitmap_data
    "table-entry-reserved-bit": ("bitmap-table-entry-reserved", 2),
    "table-entry-ones-with-offset": ("bitmap-table-entry-ones-with-offset", 2),
    "table-entry-unaligned": ("bitmap-table-entry-unaligned", 2),
    "table-size-2": ("bitmap-table-size-mismatch", 2),
    "name-duplicate": ("bitmap-name-duplicate", 2),
    "name-nul-first": ("bitmap-name-nul-unstorable", 2),
    "name-nul-duplicate": ("bitmap-name-duplicate", 2),
    "names-empty-twice": ("bitmap-name-duplicate", 2),
    # what QEMU does not check
    "ext-duplicate": ("bitmaps-extension-duplicate", 2),
    "dir-offset-past-eof": ("bitmap-directory-outside-file", 2),
    "dir-size-long": ("bitmap-directory-outside-file", 2),
    "table-offset-past-eof": ("bitmap-table-outside-file", 2),
    "table-entry-past-eof": ("bitmap-data-outside-file", 2),
    "name-empty": ("bitmap-name-empty", 0),
    "bits-past-end": ("bitmap-bits-past-end", 2),
    "ext-removed-bit0-set": ("bitmaps-autoclear-without-extension", 2),
    "data-refcount-0": ("bitmap-cluster-unallocated", 2),
    "table-refcount-0": ("bitmap-cluster-unallocated", 2),
    "dir-refcount-0": ("bitmap-cluster-unallocated", 2),
    "data-on-l1": ("bitmap-cluster-overlap", 2),
    "data-on-l2": ("bitmap-cluster-overlap", 2),
    "data-on-snapshot-l2": ("bitmap-cluster-overlap", 2),
    "data-on-refcount-table": ("bitmap-cluster-overlap", 2),
    "data-on-refcount-block": ("bitmap-cluster-overlap", 2),
    "data-on-snapshot-table": ("bitmap-cluster-overlap", 2),
    "data-on-snapshot-l1": ("bitmap-cluster-overlap", 2),
    "data-on-guest-data": ("bitmap-cluster-overlap", 2),
    "data-on-compressed-data": ("bitmap-cluster-overlap", 2),
    "data-on-other-bitmap-data": ("bitmap-cluster-overlap", 2),
    "data-on-own-table": ("bitmap-cluster-overlap", 2),
    "data-on-directory": ("bitmap-cluster-overlap", 2),
    "tables-shared": ("bitmap-cluster-overlap", 2),
    "dir-on-l2": ("bitmap-cluster-overlap", 2),
    "l2-on-directory": ("bitmap-cluster-overlap", 2),
    # leaks only
    "data-refcount-2": ("bitmap-cluster-leaked", 3),
    "dir-refcount-3": ("bitmap-cluster-leaked", 3),
    # bitmaps QEMU ignores: stale, never "leaks only"
    "autoclear-bit0-clear": ("bitmaps-extension-ignored", 4),
    "downgrade-to-v2": ("bitmaps-extension-v2", 2),
    # in use: not corruption
    "in-use": ("bitmap-in-use", 4),
    "table-size-2-in-use": ("bitmap-table-size-stale", 4),
    # the image around the bitmaps
    "incompat-corrupt-bit": ("image-marked-corrupt", 2),
    "ext-area-overrun": ("header-extensions-invalid", 2),
    "refcount-table-unaligned": ("refcount-table-invalid", 2),
    "refcount-order-7": ("refcount-table-invalid", 2),
    "refcount-block-reserved-bit": ("refcount-block-invalid", 2),
    "l1-size-zero": ("l1-table-invalid", 2),
    "l1-offset-unaligned": ("l1-table-invalid", 2),
    "l2-past-eof": ("l2-table-invalid", 2),
    "l2-on-l1": ("image-refcount-too-low", 2),
    "guest-data-refcount-0": ("image-refcount-too-low", 2),
    "snapshots-offset-unaligned": ("snapshot-table-invalid", 2),
    "nb-snapshots-one-more": ("snapshot-table-invalid", 2),
    "l1-entry-reserved-bit": ("l1-entry-invalid", 2),
    "l1-entry-flags-only": ("l1-entry-invalid", 2),
    "l1-entry-copied-clear": ("image-copied-flag-mismatch", 2),
    "l2-entry-reserved-bit": ("l2-entry-invalid", 2),
    "l2-entry-unaligned": ("l2-entry-invalid", 2),
    "l2-entry-past-eof": ("image-cluster-past-eof", 2),
    "l2-compressed-copied": ("l2-entry-invalid", 2),
    "l2-entry-copied-clear": ("image-copied-flag-mismatch", 2),
    "l2-entry-copied-on-shared": ("image-copied-flag-mismatch", 2),
    "snapshot-l2-entry-reserved-bit": ("l2-entry-invalid", 2),
    "l2-on-refcount-block": ("refcount-block-invalid", 2),
    "shared-data-refcount-1": ("image-refcount-too-low", 2),
    "crypt-method-luks": ("encryption-header-invalid", 2),
    "incompat-dirty-bit": ("image-dirty", 0),
    # notes only
    "name-nul-harmless": ("bitmap-name-nul", 0),
    "leaked-cluster": ("image-clusters-leaked", 3),
    "refcount-past-eof": ("image-clusters-leaked-past-eof", 3),
    "levels-orphan": ("levels-record-orphan", 0),
    "levels-stale": ("levels-record-stale", 0),
    "levels-version-2": ("levels-extension-invalid", 0),
    # QEMU refuses to open it
    "incompat-unknown-bit": ("image-unsupported-feature", 2),
    "version-0": ("image-invalid", 2),
    "cluster-bits-32": ("image-invalid", 2),
    "header-cut-short": ("image-invalid", 2),
    # could not check: not a qcow2 image
    "magic": ("image-unreadable", 1),
}


def test_catalogue_covers_every_edit():
    assert set(CATALOGUE) == set(corrupt.EDITS)


def test_base_image_is_clean(base_image):
    run = run_check("--json", base_image)
    assert run.exit_code == 0, run.stdout
    assert run.json["findings"] == []
    assert [(b["name"], b["status"]) for b in run.json["bitmaps"]] == [
        ("b0", "consistent"),
        ("b1", "consistent"),
    ]
    assert qemu.img_check(base_image)[0] == 0


@pytest.mark.parametrize("edit", sorted(CATALOGUE))
def test_catalogue(edit, base_image, tmp_path):
    code, exit_code = CATALOGUE[edit]
    image = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
    run = run_check("--json", image)
    report = run.json
    assert code in run.codes(), report["findings"]
    assert run.exit_code == exit_code, report["findings"]
    assert report["exit_code"] == exit_code
    finding = next(f for f in report["findings"] if f["code"] == code)
    assert finding["message"] and not finding["message"].endswith(".")
    # Cross-check with QEMU itself.
    qemu_opens = qemu.qemu_img("info", "-f", "qcow2", "-U", image, check=False).returncode == 0
    if not qemu_opens and exit_code != 1:
        assert run.exit_code == 2, f"QEMU refuses {edit}, check must say corrupt"
    if run.exit_code in (0, 3, 4):
        assert qemu_opens, f"check calls {edit} usable but QEMU cannot open it"
    if qemu_opens and exit_code != 1:
        rc, qreport = qemu.img_check(image)
        if qreport.get("corruptions", 0) or qreport.get("check-errors", 0) or rc in (1, 2):
            assert run.exit_code == 2, f"qemu-img check reports errors in {edit}: {qreport}"
        elif rc == 3 or qreport.get("leaks", 0):
            assert run.exit_code in (2, 3, 4), f"qemu-img check reports leaks in {edit}"


@pytest.mark.parametrize(
    ("edit", "bitmap", "status"),
    [
        ("in-use", "b0", "in-use"),
        ("granularity-8", "b0", "corrupt"),
        ("data-on-l2", "b0", "corrupt"),
        ("tables-shared", "b1", "corrupt"),
        ("nb-bitmaps-one-more", "b1", "corrupt"),  # the directory as a whole is bad
    ],
)
def test_bitmap_status(edit, bitmap, status, base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", edit)
    statuses = {b["name"]: b["status"] for b in run_check("--json", image).json["bitmaps"]}
    assert statuses[bitmap] == status


def test_corrupt_bitmap_does_not_taint_the_other(base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", "type-2")
    statuses = {b["name"]: b["status"] for b in run_check("--json", image).json["bitmaps"]}
    assert statuses == {"b0": "corrupt", "b1": "consistent"}


def test_qemu_check_misses_the_in_use_bitmap(base_image, tmp_path):
    """The gap check fills: qemu-img check calls an in-use bitmap fine."""
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", "in-use")
    assert qemu.img_check(image)[0] == 0
    assert run_check(image).exit_code == 4


def test_refcount_findings_agree_with_qemu_check(base_image, tmp_path):
    """Where qemu-img check sees the bitmap cluster's refcount problem, so do we."""
    for edit, qemu_exit in (("data-refcount-0", 2), ("data-refcount-2", 3), ("dir-refcount-3", 3)):
        image = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
        assert qemu.img_check(image)[0] == qemu_exit, edit


def test_overlap_message_names_the_other_owner(base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / "x.qcow2", "data-on-l2")
    finding = next(
        f
        for f in run_check("--json", image).json["findings"]
        if f["code"] == "bitmap-cluster-overlap"
    )
    assert finding["bitmap"] == "b0"
    assert "an L2 table" in finding["message"]
    lay = corrupt.layout(image)
    assert finding["offset"] == lay.entry("b0").table_offset  # the table entry that points there


@pytest.mark.parametrize("edit", sorted(CATALOGUE))
def test_check_keeps_the_reference_map(edit, base_image, tmp_path):
    """The map check_image hands back (recover reuses it) is the one reference_map builds."""
    import numpy as np

    from qbitmap.check import check_image
    from qbitmap.errors import QbitmapError
    from qbitmap.format import Image
    from qbitmap.format.references import reference_map

    image = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
    try:
        img = Image.open(image)
    except QbitmapError:
        return  # "magic", "incompat-unknown-bit": nothing to map
    with img:
        kept = check_image(img, held_locks=()).reference_map
        assert kept is not None
        fresh = reference_map(img)
        assert kept.complete == fresh.complete
        for name in (
            "clusters",
            "kinds",
            "weights",
            "bm_clusters",
            "bm_kinds",
            "bm_index",
            "bm_source",
        ):
            assert np.array_equal(getattr(kept, name), getattr(fresh, name)), name
