"""Tests of tests/qemu.py against the real QEMU 7.2 tools.

They also pin the QEMU behaviour qbitmap depends on (docs/qemu-facts.md):
lock bytes, in-use after SIGKILL, unknown header extensions kept and unknown
autoclear bits cleared on read-write open, nbdinfo's map format.
"""

from __future__ import annotations

import json
import random

import pytest
import qemu

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ALL_TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon", "nbdinfo")
WRITER_LOCKS = {100, 101, 103, 201, 203}
READER_LOCKS = {100, 201, 203}


@pytest.fixture(autouse=True)
def _tools():
    qemu.require_tools(*ALL_TOOLS)


def granules(writes, granularity, size):
    """Expected dirty ranges: each write rounded out to whole granules, cut at size."""
    out = []
    for off, length in writes:
        first = off // granularity
        last = (off + length - 1) // granularity
        start = first * granularity
        out.append((start, min((last + 1) * granularity, size) - start))
    return qemu.merge_extents(out)


# ---------------------------------------------------------------------------
# require_tools
# ---------------------------------------------------------------------------


def test_require_tools_present_is_silent():
    qemu.require_tools("qemu-img", "sh")


def test_require_tools_missing_raises_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="no-such-tool-qbm"):
        qemu.require_tools("qemu-img", "no-such-tool-qbm")


def test_require_tools_missing_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-qbm"):
        qemu.require_tools("no-such-tool-qbm")


def test_merge_extents():
    assert qemu.merge_extents([(10, 5), (0, 10), (30, 1), (15, 0), (14, 3)]) == [(0, 17), (30, 1)]


# ---------------------------------------------------------------------------
# qemu_img, create_image, add_bitmap, img_info, img_check
# ---------------------------------------------------------------------------


def test_create_image_defaults(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", 1 * GiB)
    info = qemu.img_info(p)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == GiB
    assert info["cluster-size"] == 65536
    data = info["format-specific"]["data"]
    assert data["compat"] == "1.1"
    assert data["extended-l2"] is False
    assert data["compression-type"] == "zlib"
    assert "bitmaps" not in data


def test_create_image_options(tmp_path):
    base = qemu.create_image(tmp_path / "base.qcow2", "64M", cluster_size=4096)
    p = qemu.create_image(
        tmp_path / "b.qcow2",
        None,
        cluster_size=128 * KiB,
        extended_l2=True,
        compression_type="zstd",
        backing=base,
        extra_opts=("lazy_refcounts=on", "refcount_bits=64"),
    )
    info = qemu.img_info(p)
    assert info["virtual-size"] == 64 * MiB
    assert info["cluster-size"] == 128 * KiB
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    data = info["format-specific"]["data"]
    assert data["extended-l2"] is True
    assert data["compression-type"] == "zstd"
    assert data["lazy-refcounts"] is True
    assert data["refcount-bits"] == 64


def test_create_image_v2(tmp_path):
    p = qemu.create_image(tmp_path / "v2.qcow2", "1M", compat="0.10")
    assert qemu.img_info(p)["format-specific"]["data"]["compat"] == "0.10"
    # QEMU refuses persistent bitmaps in v2 images.
    with pytest.raises(qemu.QemuError, match="v2"):
        qemu.add_bitmap(p, "b0")


def test_qemu_img_check_false_returns_failure(tmp_path):
    proc = qemu.qemu_img("info", tmp_path / "missing.qcow2", check=False)
    assert proc.returncode != 0
    assert "missing.qcow2" in proc.stderr
    with pytest.raises(qemu.QemuError):
        qemu.qemu_img("info", tmp_path / "missing.qcow2")


def test_add_bitmap_flags_and_granularity(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "daily")
    qemu.add_bitmap(p, "weekly", granularity=MiB, disabled=True)
    bm = qemu.img_bitmaps(p)
    assert bm["daily"]["granularity"] == 65536  # default = cluster size
    assert bm["daily"]["flags"] == ["auto"]
    assert bm["weekly"]["granularity"] == MiB
    assert bm["weekly"]["flags"] == []
    names = [e["name"] for e in qemu.bitmap_directory(p)]
    assert sorted(names) == ["daily", "weekly"]
    qemu.bitmap_op(p, "weekly", "--remove")
    assert list(qemu.img_bitmaps(p)) == ["daily"]


def test_img_check_clean(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "b0")
    qemu.qemu_io_write(p, [(0, 4096)])
    rc, report = qemu.img_check(p)
    assert rc == 0
    assert report["check-errors"] == 0
    assert report["filename"].endswith("a.qcow2")
    assert "leaks" not in report and "corruptions" not in report


def test_img_check_unopenable(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    rc, report = qemu.img_check(bad)
    assert rc == 1
    assert "error" in report


# ---------------------------------------------------------------------------
# qemu_io, qemu_io_write, guest_read, nbd_dirty_extents
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "granularity", "seed"),
    [
        (GiB, 64 * KiB, 1),
        (GiB, 512, 2),
        (GiB + 512, MiB, 3),  # last granule is cut at the disk size
        (8 * GiB, 4 * MiB, 4),
        (64 * MiB, 2 * GiB, 5),  # one granule bigger than the disk
    ],
)
def test_nbd_dirty_extents_match_writes(tmp_path, size, granularity, seed):
    rng = random.Random(seed)
    p = qemu.create_image(tmp_path / "a.qcow2", size)
    qemu.add_bitmap(p, "b0", granularity=granularity)
    writes = []
    for _ in range(40):
        length = rng.choice([1, 512, 4096, 65536, 100_000, 3 * MiB])
        off = rng.randrange(0, size - length + 1)
        writes.append((off, length))
    writes.append((size - 1, 1))  # touch the very last byte
    qemu.qemu_io_write(p, writes, pattern=0x42)
    assert qemu.nbd_dirty_extents(p, "b0") == granules(writes, granularity, size)


def test_disabled_bitmap_records_nothing(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "on")
    qemu.add_bitmap(p, "off", disabled=True)
    qemu.qemu_io_write(p, [(MiB, 10)], unsafe=True)
    assert qemu.nbd_dirty_extents(p, "on") == [(MiB, 65536)]
    assert qemu.nbd_dirty_extents(p, "off") == []


def test_nbd_map_json_shape(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "b0")
    qemu.qemu_io_write(p, [(0, 4096), (MiB, 65536)])
    entries = qemu.nbd_map(p, "qemu:dirty-bitmap:b0", bitmap="b0")
    assert entries == [
        {"offset": 0, "length": 65536, "type": 1, "description": "dirty"},
        {"offset": 65536, "length": MiB - 65536, "type": 0, "description": "clean"},
        {"offset": MiB, "length": 65536, "type": 1, "description": "dirty"},
        {"offset": MiB + 65536, "length": GiB - MiB - 65536, "type": 0, "description": "clean"},
    ]
    alloc = qemu.nbd_map(p)  # base:allocation
    assert alloc[0] == {"offset": 0, "length": 4096, "type": 0, "description": "data"}
    assert sum(e["length"] for e in alloc) == GiB


def test_qemu_io_write_zero_and_sort(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", 4 * GiB)
    qemu.add_bitmap(p, "b0")
    writes = [(k * 3 * MiB, 512) for k in range(1000)][::-1]
    qemu.qemu_io_write(p, writes, zero=True, sort=True, unsafe=True)
    assert qemu.nbd_dirty_extents(p, "b0") == granules(writes, 65536, 4 * GiB)
    # zero writes set zero flags, they allocate no data clusters
    assert all(e["type"] & 2 for e in qemu.nbd_map(p) if e["offset"] >= 0)


def test_qemu_io_errors_raise(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    with pytest.raises(qemu.QemuError, match="failed"):
        qemu.qemu_io_write(p, [(0, 512), (2 * MiB, 512)])
    with pytest.raises(qemu.QemuError, match="not found"):
        qemu.qemu_io(p, "no-such-command 1 2")
    with pytest.raises(ValueError):
        qemu.qemu_io_write(p, [(0, 1)], pattern=256)


def test_qemu_io_pattern_verification(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    qemu.qemu_io_write(p, [(4096, 4096)], pattern=0x77)
    qemu.qemu_io(p, "read -P 0x77 4096 4096", "read -P 0 0 4096", read_only=True)
    with pytest.raises(qemu.QemuError):
        qemu.qemu_io(p, "read -P 0x78 4096 4096", read_only=True)


def test_guest_read(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.qemu_io_write(p, [(65536, 100)], pattern=0xAB)
    assert qemu.guest_read(p, 65530, 10) == b"\0" * 6 + b"\xab" * 4
    assert qemu.nbd_data_read(p, 65536 + 96, 8) == b"\xab" * 4 + b"\0" * 4
    assert qemu.guest_read(p, 0, 0) == b""
    big = qemu.guest_read(p, 0, 200_000)
    assert big.count(b"\xab") == 100


@pytest.mark.slow
def test_qemu_io_write_200k_on_2tib(tmp_path):
    """200,000 scattered writes in one qemu-io process (fact e)."""
    p = qemu.create_image(tmp_path / "big.qcow2", 2 * 1024 * GiB)
    qemu.add_bitmap(p, "b0", granularity=64 * KiB)
    rng = random.Random(7)
    clusters = rng.sample(range(2**25), 200_000)
    writes = [(c * 65536, 512) for c in clusters]
    qemu.qemu_io_write(p, writes, zero=True, sort=True, unsafe=True, timeout=600)
    extents = qemu.nbd_dirty_extents(p, "b0")
    assert sum(n for _o, n in extents) == 200_000 * 65536
    assert extents == granules(writes, 65536, 2 * 1024 * GiB)


# ---------------------------------------------------------------------------
# StorageDaemon, QMP, crash_image
# ---------------------------------------------------------------------------


def test_storage_daemon_write_read_stop(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "b0")
    with qemu.StorageDaemon(p) as sd:
        assert sd.nbd_uri.startswith("nbd+unix:///?socket=/")
        assert "in-use" in qemu.img_bitmaps(p)["b0"]["flags"]  # marked on open
        sd.write(MiB, 4096, 0x11)
        sd.writes([(5 * MiB, 1), (9 * MiB, 70_000)], pattern=0x22)
        sd.flush()
        assert sd.read(MiB - 2, 4) == b"\0\0\x11\x11"
        sd.stop()
        assert not sd.running
    assert qemu.img_bitmaps(p)["b0"]["flags"] == ["auto"]
    assert qemu.nbd_dirty_extents(p, "b0") == [(MiB, 65536), (5 * MiB, 65536), (9 * MiB, 131072)]
    assert qemu.guest_read(p, 9 * MiB + 69_998, 4) == b"\x22\x22\0\0"


def test_storage_daemon_qmp_persistent_bitmap(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    with qemu.StorageDaemon(p, qmp=True) as sd:
        assert (
            sd.qmp(
                "block-dirty-bitmap-add", node="fmt", name="b1", persistent=True, granularity=512
            )
            == {}
        )
        sd.write(4096, 1)
        nodes = sd.qmp("query-named-block-nodes")
        bms = {b["name"]: b for n in nodes for b in n.get("dirty-bitmaps", [])}
        assert bms["b1"]["count"] == 512
        with pytest.raises(qemu.QemuError, match="GenericError|already exists|exists"):
            sd.qmp("block-dirty-bitmap-add", node="fmt", name="b1", persistent=True)
    assert qemu.img_bitmaps(p)["b1"]["granularity"] == 512
    assert qemu.nbd_dirty_extents(p, "b1") == [(4096, 512)]


def test_storage_daemon_start_failure_is_reported(tmp_path):
    sd = qemu.StorageDaemon(tmp_path / "missing.qcow2")
    with pytest.raises(qemu.QemuError, match="exited with 1 during start-up"):
        sd.start()
    assert not sd.running
    assert not sd.sock.parent.exists()  # socket directory removed


def test_storage_daemon_without_qmp_refuses_qmp(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    with (
        qemu.StorageDaemon(p, writable=False) as sd,
        pytest.raises(qemu.QemuError, match="qmp=True"),
    ):
        sd.qmp("query-version")


def test_crash_image_leaves_in_use(tmp_path):
    """Fact (b): after SIGKILL bitmaps are in-use, check is clean, data is there."""
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "b0")
    qemu.add_bitmap(p, "off", disabled=True)
    before = [(0, 4096)]
    qemu.qemu_io_write(p, before)  # recorded and stored by a clean close
    crashed = [(10 * MiB, 4096), (20 * MiB, 1)]
    qemu.crash_image(p, crashed, bitmaps=("b0", "b1"))  # b1 is added first
    bms = qemu.img_bitmaps(p)
    assert bms["b0"]["flags"] == ["in-use", "auto"]
    assert bms["b1"]["flags"] == ["in-use", "auto"]
    assert bms["off"]["flags"] == ["in-use"]  # even a disabled bitmap
    rc, report = qemu.img_check(p)
    assert (rc, report["check-errors"]) == (0, 0)
    assert qemu.guest_read(p, 10 * MiB, 2) == b"\x5a\x5a"  # flushed data survived
    with pytest.raises(qemu.QemuError, match="inconsistent and cannot be used"):
        qemu.nbd_dirty_extents(p, "b0")
    # The on-disk data is stale: clear in_use by hand and QEMU exports what
    # was stored at the last clean close, without the crashed writes.
    qemu.edit_bitmap_flags(p, "b0", clear_mask=1)
    assert qemu.nbd_dirty_extents(p, "b0") == granules(before, 65536, GiB)


def test_in_use_bitmap_what_qemu_img_allows(tmp_path):
    """Fact (b): what QEMU's own tools do with an in-use (inconsistent) bitmap."""
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.crash_image(p, [(0, 512)], bitmaps=("b0", "b1"))
    for op in ("--clear", "--enable", "--disable"):
        proc = qemu.qemu_img("bitmap", op, p, "b0", check=False)
        assert proc.returncode == 1
        assert "Bitmap 'b0' is inconsistent and cannot be used" in proc.stderr
    proc = qemu.qemu_img(
        "convert", "--bitmaps", "-O", "qcow2", p, tmp_path / "c.qcow2", check=False
    )
    assert proc.returncode == 1 and "Cannot copy inconsistent bitmap" in proc.stderr
    rc, _ = qemu.img_check(p, repair="all")
    assert rc == 0
    assert "in-use" in qemu.img_bitmaps(p)["b0"]["flags"]  # check -r all leaves it
    # a clean read-write open and close does not make it consistent again
    with qemu.StorageDaemon(p):
        pass
    assert "in-use" in qemu.img_bitmaps(p)["b0"]["flags"]
    qemu.bitmap_op(p, "b0", "--remove")  # removal is the one thing QEMU offers
    assert list(qemu.img_bitmaps(p)) == ["b1"]


def test_failed_daemon_start_leaves_in_use(tmp_path):
    """A daemon that exits on a bad option after opening the image read-write
    leaves the bitmaps in-use, like a crash."""
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    qemu.add_bitmap(p, "b0")
    sd = qemu.StorageDaemon(p, extra_args=["--export", "type=nbd,id=exp2,node-name=fmt,bogus=1"])
    with pytest.raises(qemu.QemuError, match="bogus"):
        sd.start()
    assert qemu.img_bitmaps(p)["b0"]["flags"] == ["in-use", "auto"]


# ---------------------------------------------------------------------------
# lock_bytes_held (fact a)
# ---------------------------------------------------------------------------


def test_lock_bytes(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    qemu.add_bitmap(p, "b0")
    assert qemu.lock_bytes_held(p) == set()
    with qemu.StorageDaemon(p, writable=True):
        assert qemu.lock_bytes_held(p) == WRITER_LOCKS
    assert qemu.lock_bytes_held(p) == set()
    # writable=off export on a read-write node still holds the writer set
    with qemu.StorageDaemon(p, writable=False):
        assert qemu.lock_bytes_held(p) == WRITER_LOCKS
    with qemu.StorageDaemon(p, read_only=True):
        assert qemu.lock_bytes_held(p) == READER_LOCKS
    with qemu.QemuNbd(p, read_only=True, bitmap="b0"):
        assert qemu.lock_bytes_held(p) == READER_LOCKS
    with qemu.QemuNbd(p, read_only=False):
        assert qemu.lock_bytes_held(p) == WRITER_LOCKS
    assert qemu.lock_bytes_held(p) == set()


def test_lock_bytes_after_kill_are_released(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    sd = qemu.StorageDaemon(p).start()
    try:
        assert qemu.lock_bytes_held(p) == WRITER_LOCKS
        sd.kill()
        assert qemu.lock_bytes_held(p) == set()
    finally:
        sd.close()


def test_qemu_refuses_second_writer(tmp_path):
    p = qemu.create_image(tmp_path / "a.qcow2", MiB)
    with qemu.StorageDaemon(p):
        proc = qemu.qemu_img("bitmap", "--add", p, "b9", check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        # -U readers still work
        assert qemu.img_info(p)["virtual-size"] == MiB


# ---------------------------------------------------------------------------
# Header extension / autoclear behaviour (fact c)
# ---------------------------------------------------------------------------

QBITMAP_MAGIC = 0x71626C76


@pytest.mark.parametrize("payload", [bytes(range(8)), b"abcde"])
@pytest.mark.parametrize("how", ["bitmap-add", "qemu-io-read", "crash"])
def test_unknown_extension_kept_and_autoclear_63_cleared(tmp_path, payload, how):
    p = qemu.create_image(tmp_path / "a.qcow2", GiB)
    if how != "bitmap-add":
        qemu.add_bitmap(p, "b0")
    qemu.append_header_extension(p, QBITMAP_MAGIC, payload)
    qemu.set_autoclear_bits(p, 1 << 63)
    assert (QBITMAP_MAGIC, payload) in [(m, d) for _o, m, d in qemu.header_extensions(p)]
    # read-only opens change nothing
    qemu.img_info(p)
    qemu.img_check(p)
    assert qemu.read_autoclear(p) >> 63 == 1
    if how == "bitmap-add":
        qemu.add_bitmap(p, "b0")
    elif how == "qemu-io-read":
        qemu.qemu_io(p, "read 0 512")  # read-write open, no guest write
    else:
        qemu.crash_image(p, [(0, 512)])
    assert qemu.read_autoclear(p) == 1  # bit 63 cleared, bit 0 (bitmaps) set
    exts = qemu.header_extensions(p)
    assert (QBITMAP_MAGIC, payload) in [(m, d) for _o, m, d in exts]
    # QEMU writes it after its own extensions (feature table, bitmaps)
    assert [m for _o, m, _d in exts][-1] == QBITMAP_MAGIC
    assert "b0" in qemu.img_bitmaps(p)


# ---------------------------------------------------------------------------
# Golden fixtures
# ---------------------------------------------------------------------------


def _manifest():
    return json.loads((qemu.GOLDEN_DIR / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(_manifest()))
def test_golden_images_match_manifest(tmp_path, name):
    want = _manifest()[name]
    p = qemu.golden_image(name, tmp_path)
    info = qemu.img_info(p)
    assert info["virtual-size"] == want["virtual-size"]
    assert info["cluster-size"] == want["cluster-size"]
    assert info["format-specific"]["data"]["compat"] == want["compat"]
    bms = qemu.img_bitmaps(p)
    assert sorted(bms) == sorted(want["bitmaps"])
    for bname, b in want["bitmaps"].items():
        assert bms[bname]["granularity"] == b["granularity"]
        assert bms[bname]["flags"] == b["flags"]
        if "in-use" not in b["flags"]:
            assert [list(e) for e in qemu.nbd_dirty_extents(p, bname)] == b["dirty"]
    rc, _report = qemu.img_check(p)
    assert rc == 0


def test_golden_in_use_true_dirty_covers_stored():
    b0 = _manifest()["in-use.qcow2"]["bitmaps"]["b0"]
    stored = {tuple(e) for e in b0["dirty"]}
    assert stored < {tuple(e) for e in b0["true_dirty"]}  # crashed writes missing on disk
