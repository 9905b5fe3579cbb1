"""--dry-run reports exactly the writes the real run then makes, in order."""

from __future__ import annotations

import shutil
import struct

import pytest
import qemu
from recover_helpers import SIZE

from qbitmap.recover import NewBitmap, Options, recover

MiB = 1 << 20


def _crashed(tmp_path):
    image = qemu.create_image(tmp_path / "d.qcow2", SIZE)
    qemu.add_bitmap(image, "b1", granularity=4096)
    qemu.qemu_io_write(image, [(0, MiB), (30 * MiB, 2 * MiB)], pattern=0x21)
    qemu.crash_image(image, [(8 * MiB, 4096), (SIZE - 4096, 4096)], bitmaps=("b0", "b1"))
    return image


def _ignored(tmp_path):
    image = qemu.create_image(tmp_path / "d.qcow2", SIZE)
    qemu.add_bitmap(image, "b0")
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x22)
    with open(image, "r+b") as f:
        f.seek(88)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", word & ~1))
    return image


def _disabled(tmp_path):
    image = qemu.create_image(tmp_path / "d.qcow2", SIZE)
    qemu.add_bitmap(image, "b0", disabled=True)
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x23)
    return image


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (_crashed, Options(mode="full")),
        (_crashed, Options(mode="full", names=("b1",))),
        (_ignored, Options(mode="full")),
        (_ignored, Options(drop_broken=True)),
        (_crashed, Options(create=(NewBitmap("cp1", 65536), NewBitmap("cp2", 4096)))),
        (_crashed, Options(names=("b0",), mode="full", enable=("b1",))),
        (_disabled, Options(enable=("b0",), create=(NewBitmap("cp1", 1 << 20),))),
    ],
    ids=[
        "full",
        "one-bitmap",
        "ignored-brought-back",
        "ignored-dropped",
        "created",
        "recovered-and-enabled",
        "enabled-and-created",
    ],
)
def test_dry_run_writes_are_the_real_writes(tmp_path, make, options):
    image = make(tmp_path)
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(image, copy)
    before = image.read_bytes()
    dry = recover(image, Options(**{**options.__dict__, "dry_run": True}))
    assert image.read_bytes() == before, "a dry run wrote to the image"
    assert dry.status == "dry-run" and dry.writes
    real = recover(copy, options)
    assert real.status == "recovered"
    assert dry.writes == real.writes
    assert [(s["phase"], s["action"], s["offset"], s["length"]) for s in dry.steps] == [
        (s["phase"], s["action"], s["offset"], s["length"]) for s in real.steps
    ]
    assert dry.clusters_allocated == real.clusters_allocated
    assert dry.clusters_freed == real.clusters_freed
    assert [b.to_dict() for b in dry.bitmaps] == [b.to_dict() for b in real.bitmaps]
