"""The L2 scan behind the reference map: windows scanned by two threads, results in file order.

Whatever the window size and the number of scanning threads, the map is the
same, byte for byte, as with one thread reading one cluster at a time.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import qemu

from qbitmap.check import clusters
from qbitmap.check.clusters import _in_order, reference_map
from qbitmap.format import Image

MiB = 1024 * 1024
ARRAYS = ("clusters", "kinds", "weights", "bm_clusters", "bm_kinds", "bm_index", "bm_source")


def test_in_order_yields_in_order_from_several_threads():
    seen_threads = set()
    gate = threading.Barrier(2, timeout=10)

    def fn(k, scratch):
        seen_threads.add(threading.get_ident())
        if k < 2:
            gate.wait()  # the first two items run at the same time, in two threads
        scratch.append(k)
        return k * k

    assert list(_in_order(fn, 50, 2, list)) == [k * k for k in range(50)]
    assert len(seen_threads) == 2


def test_in_order_raises_the_first_failure_in_order_and_stops():
    done = []

    def fn(k, _scratch):
        if k in (3, 7):
            raise ValueError(k)
        if k > 7:
            time.sleep(0.001)
        done.append(k)
        return k

    got: list[int] = []
    with pytest.raises(ValueError, match="3"):
        got.extend(_in_order(fn, 1000, 2, lambda: None))
    assert got == [0, 1, 2]
    assert len(done) < 1000  # the workers stopped early
    assert not any(t.name == "qbitmap-scan" for t in threading.enumerate())


def test_in_order_single_worker_runs_inline():
    idents = set()

    def fn(k, _scratch):
        idents.add(threading.get_ident())
        return k

    assert list(_in_order(fn, 5, 1, lambda: None)) == list(range(5))
    assert idents == {threading.get_ident()}


@pytest.mark.parametrize("extended_l2", [False, True])
def test_map_does_not_depend_on_windows_or_threads(tmp_path, monkeypatch, extended_l2):
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
        monkeypatch.setattr(clusters, "SCAN_WORKERS", 1)
        monkeypatch.setattr(clusters, "SCAN_WINDOW", 1)
        one = reference_map(img, use_mmap=False)
        monkeypatch.setattr(clusters, "SCAN_WORKERS", 2)
        monkeypatch.setattr(clusters, "PARALLEL_SCAN_BYTES", 0)
        used = []

        def spy(fn, count, workers, scratch):
            used.append((count, workers))
            return _in_order(fn, count, workers, scratch)

        monkeypatch.setattr(clusters, "_in_order", spy)
        for batch in (1, 4096, 16 << 20):
            monkeypatch.setattr(clusters, "SCAN_WINDOW", batch)
            for use_mmap in (True, False):
                other = reference_map(img, use_mmap=use_mmap)
                assert other.complete and one.complete
                for name in ARRAYS:
                    assert np.array_equal(getattr(one, name), getattr(other, name)), (
                        batch,
                        use_mmap,
                        name,
                    )
        assert len(one.clusters) > 100
        assert any(count > 1 and workers == 2 for count, workers in used)
