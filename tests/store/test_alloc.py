"""The allocator against qemu-img check, for every refcount width and small clusters."""

from __future__ import annotations

import random
import struct

import pytest
from crashdisk import CrashingDisk, SimulatedCrash
from store_helpers import check_counts

from qbitmap.errors import RefusedError, UnsupportedImageError
from qbitmap.format import Image
from qbitmap.format.references import reference_map
from qbitmap.store import WriteSession

REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("refcount_bits", REFCOUNT_BITS)
def test_allocate_then_free_every_refcount_width(img, refcount_bits):
    path = img("32M", refcount_bits=refcount_bits)
    with WriteSession.open(path) as s:
        extents = [s.allocate(s.cluster_size * n, what="test") for n in (1, 3, 7)]
        for e in extents:  # contents: qemu-img check ignores refcounts past EOF
            s.write(e.offset, b"\xa5" * (e.count * s.cluster_size), what="test")
        s.flush()
    assert check_counts(path) == (3, 0, 11)  # leaks only: 11 unreferenced clusters
    with Image.open(path) as image:
        refcounts = reference_map(image).refcounts  # as stored in the image
        for e in extents:
            first = e.offset // image.cluster_size
            assert refcounts[first : first + e.count].tolist() == [1] * e.count
    with WriteSession.open(path) as s:
        s.free(extents, what="test")
        s.flush()
    assert check_counts(path) == (0, 0, 0)


@pytest.mark.parametrize("refcount_bits", [1, 16, 64])
def test_refcount_blocks_created_and_table_grown(img, refcount_bits):
    # 512-byte clusters: one refcount block covers 4096 (1-bit) .. 64 (64-bit)
    # clusters, and the one-cluster table 64 blocks.
    path = img("64M", cluster_size=512, refcount_bits=refcount_bits)
    per_table = 64 * (512 * 8 // refcount_bits)
    total = per_table + 300  # forces new blocks and, at least once, a bigger table
    with WriteSession.open(path) as s:
        extents = []
        allocated = 0
        while allocated < total:
            n = random.Random(allocated).randint(1, 150)
            extents.append(s.allocate(512 * n, what="test"))
            s.write(extents[-1].offset, bytes(512 * n), what="test")
            allocated += n
        s.flush()
        assert s.allocator.blocks_created
        assert s.allocator.table_moves, "the refcount table should have grown"
        assert s.header.refcount_table_clusters > 1
    _rc, corruptions, leaks = check_counts(path)
    assert (corruptions, leaks) == (0, allocated)
    with Image.open(path) as image:
        assert image.header.refcount_table_clusters > 1  # the 12-byte switch reached the file
    with WriteSession.open(path) as s:
        s.free(extents, what="test")
        s.flush()
    assert check_counts(path) == (0, 0, 0)


def test_run_longer_than_a_refcount_block(img):
    # 64-bit refcounts, 512-byte clusters: one block covers 64 clusters; a
    # 1000-cluster run spans many missing blocks, which must go outside it.
    path = img("64M", cluster_size=512, refcount_bits=64)
    with WriteSession.open(path) as s:
        e = s.allocate(512 * 1000, what="big")
        s.write(e.offset, bytes(512 * 1000), what="big")
        s.flush()
    assert e.count == 1000
    assert check_counts(path) == (3, 0, 1000)


def _set_incompatible(path, bit):
    with open(path, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0] | 1 << bit
        f.seek(72)
        f.write(struct.pack(">Q", value))


@pytest.mark.parametrize(
    ("bit", "error", "text"),
    [
        (0, RefusedError, "dirty bit"),
        (1, RefusedError, "corrupt bit"),
        (9, UnsupportedImageError, "unknown incompatible"),
    ],
)
def test_refuses_dirty_corrupt_unknown(img, bit, error, text):
    path = img()
    _set_incompatible(path, bit)
    before = path.read_bytes()
    with pytest.raises(error, match=text), WriteSession.open(path):
        pass
    assert path.read_bytes() == before


def test_refuses_version_2(img):
    path = img(compat="0.10")
    with pytest.raises(UnsupportedImageError, match="version 2"), WriteSession.open(path):
        pass


def test_unknown_autoclear_bits_are_cleared_before_writing(img):
    import qemu

    path = img()
    qemu.set_autoclear_bits(path, 1 << 40 | 1 << 63)
    with WriteSession.open(path) as s:
        s.allocate(s.cluster_size, what="x")
    assert qemu.read_autoclear(path) == 1 << 63  # bit 63 is qbitmap's own, kept


@pytest.mark.parametrize("lose_unflushed", [False, True])
def test_crash_at_every_step_of_growth_leaves_only_leaks(img, tmp_path, lose_unflushed):
    template = img("64M", cluster_size=512, refcount_bits=64, name="t.qcow2")

    # Count the operations of a run that creates blocks and grows the table.
    def run(path, crash_at):
        with WriteSession.open(
            path,
            disk_wrapper=lambda d: CrashingDisk(
                d, crash_at, lose_unflushed=lose_unflushed, rng=random.Random(crash_at)
            ),
        ) as s:
            for _ in range(5):
                s.allocate(512 * 1000, what="x")
            s.flush()
            return s.disk.ops

    probe = tmp_path / "probe.qcow2"
    probe.write_bytes(template.read_bytes())
    total = run(probe, None)
    assert total > 20
    step = 1 if total < 80 else total // 60
    for crash_at in range(0, total, step):
        path = tmp_path / "c.qcow2"
        path.write_bytes(template.read_bytes())
        with pytest.raises(SimulatedCrash):
            run(path, crash_at)
        rc, corruptions, _leaks = check_counts(path)
        assert corruptions == 0 and rc in (0, 3), (crash_at, rc)
