"""A reference that is the image itself would hide every write: refused before anything is written."""

from __future__ import annotations

import os

import pytest
import qemu
from recover_helpers import run_cli, sha

MiB = 1 << 20


@pytest.fixture
def crashed(tmp_path):
    image = qemu.create_image(tmp_path / "d.qcow2", 64 * MiB)
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x11)
    qemu.add_bitmap(image, "b0")
    qemu.crash_image(image, [(8 * MiB, 4096)], bitmaps=("b0",))
    return image


def _self_references(image, tmp_path):
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    hard = tmp_path / "hard.qcow2"
    os.link(image, hard)
    overlay = qemu.create_image(tmp_path / "overlay.qcow2", None, backing=image)
    deeper = qemu.create_image(tmp_path / "deeper.qcow2", None, backing=overlay)
    return {
        "same path": image,
        "symlink": link,
        "hard link": hard,
        "overlay on it": overlay,
        "two layers on it": deeper,
    }


def test_every_name_of_the_image_is_refused(crashed, tmp_path):
    refs = _self_references(crashed, tmp_path)
    before = sha(crashed)
    for what, ref in refs.items():
        for fmt in ((), ("--reference-format", "qcow2")):
            result = run_cli("recover", "--reference", ref, *fmt, crashed)
            assert result.exit_code == 64, (what, result.output)
            assert "every granule would compare equal" in result.stderr, what
            assert sha(crashed) == before, what
        json_run = run_cli("recover", "--json", "--reference", ref, crashed)
        assert json_run.exit_code == 64, what


def test_the_images_own_backing_file_is_a_fine_reference(tmp_path):
    base = qemu.create_image(tmp_path / "base.qcow2", 64 * MiB)
    qemu.qemu_io_write(base, [(0, MiB)], pattern=0x11)
    image = qemu.create_image(tmp_path / "top.qcow2", None, backing=base)
    qemu.add_bitmap(image, "b0")
    qemu.crash_image(image, [(8 * MiB, 4096)], bitmaps=("b0",))
    result = run_cli("recover", "--reference", base, image)
    assert result.exit_code == 0, result.output
    assert qemu.nbd_dirty_extents(image, "b0") == [(8 * MiB, 64 * 1024)]
