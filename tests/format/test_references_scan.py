"""The L2 scan behind the reference map: windows read by several threads, results in file order.

Whatever the window size and the number of scanning threads, the map is the
same, byte for byte, as with one thread reading one cluster at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import qemu

from qbitmap.format import Image
from qbitmap.format.references import walk

MiB = 1024 * 1024
ARRAYS = ("clusters", "kinds", "weights", "bm_clusters", "bm_kinds", "bm_index", "bm_source")


@pytest.mark.parametrize("extended_l2", [False, True])
def test_map_does_not_depend_on_windows_or_threads(tmp_path, extended_l2):
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path / "many-l2.qcow2"
    # 512-byte clusters: every 32 KiB of guest data needs its own L2 table, and the
    # tables end up scattered between data clusters (many windows of every length).
    qemu.create_image(
        path, 64 * MiB, cluster_size=512 if not extended_l2 else 16384, extended_l2=extended_l2
    )
    qemu.add_bitmap(path, "b0", granularity=512 if not extended_l2 else 16384)
    qemu.qemu_io(
        path,
        *(f"write -P {1 + i % 200} {i * 613 * 1024} 4k" for i in range(100)),
        "write -c 40M 64k",
        "write -z 50M 1M",
    )
    with Image.open(path) as img:
        bitmaps = img.bitmap_structures()
        one = walk(img, bitmaps, workers=1, scan_window=1)
        assert one.complete and not one.defects
        assert len(one.clusters) > 100
        for window in (1, 4096, 16 << 20):
            for workers in (1, 2):
                other = walk(img, bitmaps, workers=workers, scan_window=window)
                assert other.complete and not other.defects
                for name in ARRAYS:
                    assert np.array_equal(getattr(one, name), getattr(other, name)), (
                        window,
                        workers,
                        name,
                    )
                assert np.array_equal(one.refcounts, other.refcounts)
