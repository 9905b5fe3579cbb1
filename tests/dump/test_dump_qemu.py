"""``qbitmap dump --json --extents`` equals what QEMU itself serves.

For every consistent bitmap the extents must equal ``qemu-nbd -r -B NAME`` +
``nbdinfo --json --map=qemu:dirty-bitmap:NAME``; name, granularity and flags
must equal ``qemu-img info``.  Write patterns are seeded random (or drawn by
hypothesis).  For an in-use bitmap QEMU refuses to serve it, so the test
proves the dump shows the data of the last clean close.
"""

from __future__ import annotations

import random
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
import qemu
from dumprun import dump
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.fixture(autouse=True)
def _tools() -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


def random_writes(
    seed: int, disk: int, count: int, *, max_len: int = 256 * KiB
) -> list[tuple[int, int]]:
    """*count* writes at 512-aligned offsets, of 512 B .. *max_len*, inside *disk* bytes."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randrange(1, max_len // 512 + 1) * 512
        out.append((rng.randrange(0, (disk - length) // 512 + 1) * 512, length))
    return out


def assert_matches_qemu(path: Path, *, expect_bitmaps: int | None = None) -> dict:
    """Dump every bitmap of *path* and compare each with QEMU; return the dump."""
    result = dump("--json", "--extents", path)
    assert result.exit_code == 0, result.stderr
    report = result.json
    info = qemu.img_bitmaps(path)
    assert [b["name"] for b in report["bitmaps"]] == list(info)
    if expect_bitmaps is not None:
        assert len(report["bitmaps"]) == expect_bitmaps
    for bitmap in report["bitmaps"]:
        name = bitmap["name"]
        assert bitmap["granularity"] == info[name]["granularity"]
        assert bitmap["flags"] == info[name]["flags"]
        ours = result.extents(name)
        assert ours == qemu.nbd_dirty_extents(path, name), name
        assert bitmap["dirty_bytes"] == sum(n for _, n in ours)
        # Sorted, merged, inside the disk.
        assert all(a + n < b for (a, n), (b, _) in pairwise(ours))
        assert all(0 <= a and a + n <= report["virtual_size"] for a, n in ours)
    return report


def test_granularities_512_bytes_to_several_mib(tmp_path: Path) -> None:
    path = qemu.create_image(tmp_path / "g.qcow2", GiB)
    for g in (512, 4 * KiB, 64 * KiB, MiB, 8 * MiB):
        qemu.add_bitmap(path, f"g{g}", granularity=g)
    qemu.qemu_io_write(path, random_writes(1, GiB, 300), unsafe=True)
    report = assert_matches_qemu(path, expect_bitmaps=5)
    dirty = [b["dirty_bytes"] for b in report["bitmaps"]]
    assert dirty == sorted(dirty) and dirty[0] < dirty[-1]  # coarser bitmaps cover more


@pytest.mark.parametrize(
    ("cluster_size", "disk", "granularities"),
    [(512, 32 * MiB, (512, 64 * KiB)), (2 * MiB, 4 * GiB, (64 * KiB, 2 * MiB))],
)
def test_cluster_sizes(
    tmp_path: Path, cluster_size: int, disk: int, granularities: tuple[int, ...]
) -> None:
    path = qemu.create_image(tmp_path / "c.qcow2", disk, cluster_size=cluster_size)
    for g in granularities:
        qemu.add_bitmap(path, f"g{g}", granularity=g)
    qemu.qemu_io_write(path, random_writes(cluster_size, disk, 200), unsafe=True)
    report = assert_matches_qemu(path)
    assert report["cluster_size"] == cluster_size
    # With 512-byte clusters a 512 B-granularity bitmap needs many table entries.
    if cluster_size == 512:
        assert report["bitmaps"][0]["table_size"] == disk // 512 // 8 // 512


def test_extended_l2(tmp_path: Path) -> None:
    path = qemu.create_image(tmp_path / "x.qcow2", GiB, extended_l2=True)
    qemu.add_bitmap(path, "b0", granularity=4 * KiB)
    qemu.qemu_io_write(path, random_writes(7, GiB, 150), unsafe=True)
    report = assert_matches_qemu(path, expect_bitmaps=1)
    assert "extended L2 entries" in report["features"]["incompatible"]


def test_disabled_bitmap_and_several_bitmaps(tmp_path: Path) -> None:
    path = qemu.create_image(tmp_path / "d.qcow2", GiB)
    qemu.add_bitmap(path, "always")
    qemu.add_bitmap(path, "paused")
    qemu.qemu_io_write(path, random_writes(11, GiB, 50))
    qemu.bitmap_op(path, "paused", "--disable")
    qemu.add_bitmap(path, "late", granularity=MiB)
    qemu.qemu_io_write(path, random_writes(12, GiB, 50))
    report = assert_matches_qemu(path, expect_bitmaps=3)
    flags = {b["name"]: b["flags"] for b in report["bitmaps"]}
    assert flags == {"always": ["auto"], "paused": [], "late": ["auto"]}
    dirty = {b["name"]: b["dirty_bytes"] for b in report["bitmaps"]}
    assert 0 < dirty["paused"] < dirty["always"]


def test_multi_tib_disk(tmp_path: Path) -> None:
    path = qemu.create_image(tmp_path / "big.qcow2", 4 * TiB)
    qemu.add_bitmap(path, "b0")
    writes = random_writes(4, 4 * TiB, 3000, max_len=4 * MiB)
    qemu.qemu_io_write(path, writes, zero=True, unsafe=True, sort=True)
    report = assert_matches_qemu(path, expect_bitmaps=1)
    assert report["virtual_size"] == 4 * TiB
    assert report["bitmaps"][0]["table_size"] == 4 * TiB // 65536 // 8 // 65536


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    granularity_bits=st.integers(9, 23),
    cluster_bits=st.sampled_from([9, 12, 16, 21]),
    disk_sectors=st.integers(1, 200_000),
    writes=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 2048)), min_size=1, max_size=40),
)
def test_hypothesis_patterns(
    tmp_path_factory: pytest.TempPathFactory,
    granularity_bits: int,
    cluster_bits: int,
    disk_sectors: int,
    writes: list[tuple[float, int]],
) -> None:
    disk = disk_sectors * 512
    path = qemu.create_image(
        tmp_path_factory.mktemp("hyp") / "h.qcow2", disk, cluster_size=1 << cluster_bits
    )
    qemu.add_bitmap(path, "b0", granularity=1 << granularity_bits)
    extents = []
    for where, sectors in writes:
        length = min(sectors, disk_sectors) * 512
        start = int(where * (disk - length)) // 512 * 512
        extents.append((start, length))
    qemu.qemu_io_write(path, extents)
    assert_matches_qemu(path, expect_bitmaps=1)


def test_in_use_bitmap_shows_the_last_clean_close(tmp_path: Path) -> None:
    qemu.require_tools("qemu-storage-daemon")
    path = qemu.create_image(tmp_path / "crash.qcow2", GiB)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1", granularity=MiB)
    before = random_writes(21, GiB, 40)
    qemu.qemu_io_write(path, before)  # clean close: stored
    stored = {name: qemu.nbd_dirty_extents(path, name) for name in ("b0", "b1")}
    clean = dump("--json", "--extents", path)
    assert all(clean.extents(n) == stored[n] for n in stored)

    after = random_writes(22, GiB, 40)
    qemu.crash_image(path, after, bitmaps=("b0", "b1"))
    crashed = dump("--json", "--extents", path)
    assert crashed.exit_code == 0
    for bitmap in crashed.json["bitmaps"]:
        assert (
            bitmap["flags"] == ["in-use", "auto"] == qemu.img_bitmaps(path)[bitmap["name"]]["flags"]
        )
        assert bitmap["in_use"] is True and bitmap["stale"] is True
        # The on-disk data is exactly what was stored at the last clean close ...
        assert crashed.extents(bitmap["name"]) == stored[bitmap["name"]]
    # ... which misses writes that happened since: the data really is stale.
    merged = qemu.merge_extents(before + after)
    assert crashed.extents("b0") != qemu.merge_extents(
        [(a // 65536 * 65536, -(-(a + n) // 65536) * 65536 - a // 65536 * 65536) for a, n in merged]
    )
    # A clear warning per bitmap, on stderr (stdout stays JSON).
    warnings = [line for line in crashed.stderr.splitlines() if "stale" in line]
    assert len(warnings) == 2 and all(line.startswith("qbitmap: warning: ") for line in warnings)

    # QEMU refuses to serve an in-use bitmap ...
    with pytest.raises(qemu.QemuError, match="inconsistent"):
        qemu.nbd_dirty_extents(path, "b0")
    # ... but with in_use cleared on a scratch copy it serves the on-disk data: ours.
    scratch = tmp_path / "scratch.qcow2"
    shutil.copyfile(path, scratch)
    for name in ("b0", "b1"):
        qemu.edit_bitmap_flags(scratch, name, clear_mask=1)
        assert qemu.nbd_dirty_extents(scratch, name) == crashed.extents(name)


def test_human_view_of_an_in_use_bitmap(tmp_path: Path) -> None:
    qemu.require_tools("qemu-storage-daemon")
    path = qemu.create_image(tmp_path / "crash.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.crash_image(path, [(0, 4096)])
    result = dump("--extents", path)
    assert result.exit_code == 0
    assert "in-use, auto" in result.stdout
    assert "STALE" in result.stdout
    assert "warning: bitmap 'b0' is in use" in result.stdout
    assert "stale" in result.stderr
