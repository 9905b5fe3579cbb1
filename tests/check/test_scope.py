"""check_image's ``open`` scope (what QEMU checks when it opens an image) against the full check.

``qbitmap checkpoints`` judges libvirt's checkpoints with the open scope: it
must reach the same verdict as the full check on every image of the
corruption catalogue whose problem QEMU notices at open (``qemu-img info``
refuses it), and it never reports what the full check does not.
"""

from __future__ import annotations

import corrupt
import pytest
import qemu
from test_catalogue import CATALOGUE

from qbitmap.check import SCOPES, check_image
from qbitmap.check.chain import LayerView, judge_bitmap
from qbitmap.errors import QbitmapError
from qbitmap.format import Image
from qbitmap.format.chain import ChainLayer

#: Edits whose problem QEMU does not notice at open, yet the open scope must see anyway:
#: they are in the header QEMU reads, or in the flags and names of the bitmaps it loads.
OPEN_SCOPE_SEES = {
    "ext-duplicate",
    "ext-removed-bit0-set",
    "name-empty",
    "name-nul-harmless",
    "name-nul-first",  # QEMU opens it read-only; a read-write open (a domain start) fails
    "in-use",
    "table-size-2-in-use",
    "incompat-corrupt-bit",  # the same: read-only only
    "incompat-dirty-bit",
}


def _both(path):
    try:
        image = Image.open(path)
    except QbitmapError:
        return None
    with image:
        full = check_image(image, held_locks=())
        opened = check_image(image, held_locks=(), scope="open")
    return full, opened


def _verdicts(report, path) -> dict[str, str]:
    view = LayerView(ChainLayer(0, path, "qcow2", "top", cluster_size=65536), report)
    return {b.name: judge_bitmap(b.name, [view]).verdict for b in report.bitmaps}


@pytest.mark.parametrize("edit", sorted(CATALOGUE))
def test_the_open_scope_agrees_where_qemu_refuses_to_open(edit, base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
    both = _both(image)
    if both is None:
        return  # not an image qbitmap opens at all ("magic", unknown features): the same
    full, opened = both
    full_codes = {f.code for f in full.findings}
    opened_codes = {f.code for f in opened.findings}
    assert opened_codes <= full_codes, opened_codes - full_codes
    assert opened.reference_map is None
    qemu_opens = qemu.qemu_img("info", "-f", "qcow2", "-U", image, check=False).returncode == 0
    if not qemu_opens or edit in OPEN_SCOPE_SEES:
        assert opened.exit_code == full.exit_code, (opened_codes, full_codes)
        assert [b.name for b in opened.bitmaps] == [b.name for b in full.bitmaps]
        assert _verdicts(opened, image) == _verdicts(full, image)
    else:
        # What only the deep walk (or the data) shows: QEMU opens the image and loads its
        # bitmaps, so libvirt judges them by their flags, as the open scope does.
        assert opened.exit_code in (0, 4), (edit, opened_codes)


def test_a_clean_image_is_clean_in_both(base_image):
    with Image.open(base_image) as image:
        for scope in SCOPES:
            report = check_image(image, held_locks=(), scope=scope)
            assert report.exit_code == 0 and report.findings == []


def test_an_unknown_scope_is_refused(base_image):
    with Image.open(base_image) as image, pytest.raises(ValueError):
        check_image(image, scope="quick")
