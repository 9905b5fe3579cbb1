"""Healthy images of every shape QEMU makes: check is silent and the reference map is exact.

For each image the reference map's count of references to every cluster of
the file must equal the cluster's refcount -- the invariant ``qemu-img check``
verifies -- which pins the map's handling of snapshots, compressed clusters,
extended L2 entries, sub-byte and 64-bit refcounts, LUKS headers, external
data files and 512-byte clusters.
"""

from __future__ import annotations

import numpy as np
import pytest
import qemu
from checkrun import run_check

from qbitmap.check import check_image
from qbitmap.format import Image
from qbitmap.format.references import reference_map, walk

MiB = 1024 * 1024
SECRET = "secret,id=sec0,data=qbitmap"
LUKS_OPTS = "driver=qcow2,file.filename={path},encrypt.key-secret=sec0"


def _writes(path, *cmds, image_opts=False):
    if image_opts:
        qemu._run(
            ["qemu-io", "--object", SECRET, "--image-opts", LUKS_OPTS.format(path=path)],
            input="".join(c + "\n" for c in cmds),
        )
    else:
        qemu.qemu_io(path, *cmds)


def make(kind: str, tmp_path):
    path = tmp_path / f"{kind}.qcow2"
    if kind == "base":
        import corrupt

        return corrupt.make_base(path)
    if kind == "extended-l2":
        qemu.create_image(path, 64 * MiB, extended_l2=True)
        qemu.add_bitmap(path, "b0")
        _writes(path, "write 0 4k", "write 1M 64k", "write -z 8M 1M", "write -c 16M 64k")
    elif kind in ("refcount-1", "refcount-64", "refcount-2"):
        bits = kind.split("-")[1]
        qemu.create_image(path, 64 * MiB, extra_opts=[f"refcount_bits={bits}"])
        qemu.add_bitmap(path, "b0")
        _writes(path, "write 0 1M", "write 40M 64k")
    elif kind == "cluster-512":
        qemu.create_image(path, 16 * MiB, cluster_size=512)
        qemu.add_bitmap(path, "b0", granularity=512)
        _writes(path, "write 0 100k", "write -c 1M 512", "write 15M 8k")
        qemu.qemu_img("snapshot", "-c", "s1", path)
        _writes(path, "write 0 1k")
    elif kind == "cluster-2m":
        qemu.create_image(path, 512 * MiB, cluster_size=2 * MiB)
        qemu.add_bitmap(path, "b0", granularity=65536)
        _writes(path, "write 0 1M", "write 300M 4M")
    elif kind == "snapshots":
        qemu.create_image(path, 64 * MiB)
        qemu.add_bitmap(path, "b0")
        for i in range(3):
            _writes(path, f"write -P {i + 1} {i}M 1M")
            qemu.qemu_img("snapshot", "-c", f"s{i}", path)
        qemu.qemu_img("snapshot", "-d", "s1", path)
        _writes(path, "write 10M 64k")
    elif kind == "luks":
        # QEMU times PBKDF2 on the CPU before it writes a LUKS header and, on a
        # loaded machine, sometimes gives up ("Unable to get accurate CPU usage").
        for attempt in range(5):
            proc = qemu.qemu_img(
                "create",
                "-q",
                "--object",
                SECRET,
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                path,
                "64M",
                check=False,
            )
            if proc.returncode == 0:
                break
            assert "accurate CPU usage" in proc.stderr, proc.stderr
        else:
            raise AssertionError("qemu-img could not create a LUKS image in 5 attempts")
        qemu.qemu_img(
            "bitmap", "--object", SECRET, "--image-opts", LUKS_OPTS.format(path=path), "--add", "b0"
        )
        _writes(path, "write 0 1M", image_opts=True)
    elif kind == "external-data":
        qemu.create_image(path, 64 * MiB, extra_opts=[f"data_file={tmp_path / 'data.raw'}"])
        qemu.add_bitmap(path, "b0")
        _writes(path, "write 0 1M", "write 20M 64k")
    elif kind == "backing":
        back = qemu.create_image(tmp_path / "back.qcow2", 64 * MiB)
        _writes(back, "write 0 8M")
        qemu.create_image(path, None, backing=back)
        qemu.add_bitmap(path, "b0")
        _writes(path, "write 1M 64k")
    elif kind == "many-bitmaps":
        qemu.create_image(path, 64 * MiB)
        for i in range(20):
            qemu.add_bitmap(path, f"bitmap-{i}", granularity=512 << (i % 8))
        _writes(path, "write 0 1M", "write 63M 1M")
    elif kind == "odd-size":
        qemu.create_image(path, 100 * MiB + 512)
        qemu.add_bitmap(path, "b0", granularity=4096)
        _writes(path, f"write {100 * MiB - 4096} 4608")
    elif kind == "no-bitmaps-v2":
        qemu.create_image(path, 64 * MiB, compat="0.10")
        _writes(path, "write 0 1M")
    elif kind == "removed-bitmaps":
        qemu.create_image(path, 64 * MiB)
        qemu.add_bitmap(path, "b0")
        _writes(path, "write 0 1M")
        qemu.bitmap_op(path, "b0", "--remove")
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


KINDS = [
    "base",
    "extended-l2",
    "refcount-1",
    "refcount-2",
    "refcount-64",
    "cluster-512",
    "cluster-2m",
    "snapshots",
    "luks",
    "external-data",
    "backing",
    "many-bitmaps",
    "odd-size",
    "no-bitmaps-v2",
    "removed-bitmaps",
]


@pytest.mark.parametrize("kind", KINDS)
def test_clean_image(kind, tmp_path):
    qemu.require_tools("qemu-img", "qemu-io")
    path = make(kind, tmp_path)
    if kind == "luks":
        proc = qemu.qemu_img(
            "check", "--object", SECRET, "--image-opts", LUKS_OPTS.format(path=path), check=False
        )
        assert proc.returncode == 0, proc.stderr
    else:
        assert qemu.img_check(path)[0] == 0
    run = run_check("--json", path)
    assert run.json["findings"] == [], run.json["findings"]
    assert run.exit_code == 0
    assert all(b["status"] == "consistent" for b in run.json["bitmaps"])
    names = set(qemu.img_bitmaps(path)) if kind != "luks" else {"b0"}
    assert {b["name"] for b in run.json["bitmaps"]} == names
    with Image.open(path) as img:
        refmap = walk(img)  # without the bitmaps
        refcounts = refmap.refcounts
        full = reference_map(img)
        assert full.complete and not full.defects
        assert refcounts is not None
        clusters = np.arange(len(refcounts), dtype=np.int64)
        assert np.array_equal(full.reference_counts(clusters), refcounts.astype(np.int64))
        # The map check_image keeps (recover reuses it) is the same map.
        kept = check_image(img, held_locks=()).reference_map
        assert kept is not None and kept.complete
        assert np.array_equal(kept.clusters, full.clusters)
        assert np.array_equal(kept.weights, full.weights)
        assert np.array_equal(kept.bm_clusters, full.bm_clusters)
        assert np.array_equal(kept.bm_index, full.bm_index)
        # Without the bitmaps, exactly the bitmap clusters are missing.
        bitmap_clusters = np.unique(full.bm_clusters)
        without = refmap.reference_counts(clusters)
        assert np.array_equal(
            np.flatnonzero(without != refcounts.astype(np.int64)), bitmap_clusters
        )
