"""qbitmap checkpoints --repair on a synthetic libvirt host: libvirt's files, images made by QEMU.

Every repair is judged by QEMU (qemu-img check, the dirty map it exports
over NBD) and by the diagnosis that follows it; the proof against libvirt
itself is test_repair_live.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import qemu
from click.testing import CliRunner
from crashdisk import SimulatedCrash
from libvirt_files import Disk, Host

from qbitmap.cli import cli
from qbitmap.recover import Options, recover

MiB = 1 << 20
SIZE = 64 * MiB


def run(host: Host, *args: str | Path):
    return CliRunner().invoke(
        cli, ["checkpoints", *host.args(), *map(str, args)], catch_exceptions=False
    )


def run_json(host: Host, *args: str | Path) -> tuple[int, dict]:
    result = run(host, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def verdicts(report: dict) -> dict[tuple[str, str], str]:
    return {(c["name"], d["disk"]): d["verdict"] for c in report["checkpoints"] for d in c["disks"]}


KEYS = ("checkpoint", "disk", "layer", "problem", "action", "mode", "granularity")


def done(report: dict) -> list[tuple]:
    return [tuple(r[k] for k in KEYS) for r in report["repair"]["repairs"]]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def merged(*extents: tuple[int, int]) -> list[tuple[int, int]]:
    return qemu.merge_extents(extents)


def granules(writes, granularity: int) -> list[tuple[int, int]]:
    out = []
    for offset, length in writes:
        start = offset // granularity * granularity
        out.append((start, -(-(offset + length) // granularity) * granularity - start))
    return qemu.merge_extents(out)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon", "qemu-nbd", "nbdinfo")
    return Host(tmp_path)


def _domain(host: Host, name: str = "vm", **sizes: int) -> dict[str, Path]:
    """Domain *name* with a qcow2 disk per keyword (target=cluster size) and cp1, cp2 on each."""
    disks = {
        target: qemu.create_image(host.images / f"{name}-{target}.qcow2", SIZE, cluster_size=cs)
        for target, cs in (sizes or {"vda": 65536}).items()
    }
    host.define(name, [Disk(t, str(p)) for t, p in disks.items()])
    every = tuple((t, "bitmap") for t in disks)
    host.checkpoint(name, "cp1", disks=every)
    host.checkpoint(name, "cp2", parent="cp1", disks=every)
    for image in disks.values():
        qemu.add_bitmap(image, "cp1")
        qemu.qemu_io_write(image, [(MiB, MiB)], pattern=0x31)
        qemu.add_bitmap(image, "cp2")
        qemu.qemu_io_write(image, [(8 * MiB, MiB)], pattern=0x32)
    return disks


def test_every_kind_of_problem_is_repaired_and_qemu_agrees(host):
    disks = _domain(host, vda=65536, vdb=512)
    vda, vdb = disks["vda"], disks["vdb"]
    qemu.crash_image(vda, [(20 * MiB, MiB)], bitmaps=("cp1", "cp2"))
    qemu.bitmap_op(vdb, "cp1", "--disable")
    qemu.bitmap_op(vdb, "cp2", "--remove")
    assert run_json(host, "vm")[0] == 4
    code, report = run_json(host, "vm", "--repair")
    assert code == 0, report["repair"]
    assert report["repair"]["status"] == "repaired" and report["exit_code"] == 0
    assert report["repair"]["exit_code_before"] == 4
    assert set(verdicts(report).values()) == {"ok"}
    assert done(report) == [  # image by image
        ("cp1", "vda", 0, "in-use", "recover", "full", None),
        ("cp2", "vda", 0, "in-use", "recover", "full", None),
        ("cp1", "vdb", 0, "not-recording", "enable", "full", None),
        # QEMU's default for 512-byte clusters, as libvirt's checkpoints get it.
        ("cp2", "vdb", 0, "missing", "create", "full", 4096),
    ]
    assert [i["filename"] for i in report["repair"]["images"]] == [str(vda), str(vdb)]
    for image in (vda, vdb):
        assert qemu.img_check(image)[0] == 0
        bitmaps = qemu.img_bitmaps(image)
        assert {n: b["flags"] for n, b in bitmaps.items()} == {"cp1": ["auto"], "cp2": ["auto"]}
        for name in ("cp1", "cp2"):
            assert qemu.nbd_dirty_extents(image, name) == [(0, SIZE)], (image, name)
    assert qemu.img_bitmaps(vdb)["cp2"]["granularity"] == 4096
    # Run again: nothing is left to repair, nothing is written.
    before = sha(vda), sha(vdb)
    code, again = run_json(host, "vm", "--repair")
    assert code == 0 and again["repair"]["status"] == "nothing-to-do"
    assert (sha(vda), sha(vdb)) == before


def test_a_gap_is_filled_with_the_granularity_of_the_nearest_layer(host):
    base = qemu.create_image(host.images / "base.qcow2", SIZE)
    qemu.add_bitmap(base, "cp1", granularity=16384)
    mid = qemu.create_image(host.images / "mid.qcow2", None, backing=base)
    qemu.add_bitmap(mid, "cp1", granularity=16384)
    top = qemu.create_image(host.images / "top.qcow2", None, backing=mid)
    qemu.add_bitmap(top, "cp1", granularity=16384)
    qemu.bitmap_op(mid, "cp1", "--remove")
    host.define("vm", [Disk("vda", str(top))])
    host.checkpoint("vm", "cp1")
    assert verdicts(run_json(host, "vm")[1]) == {("cp1", "vda"): "gap"}
    code, report = run_json(host, "vm", "--repair")
    assert code == 0
    assert done(report) == [("cp1", "vda", 1, "gap", "create", "full", 16384)]
    assert qemu.img_bitmaps(mid)["cp1"] == {"flags": ["auto"], "granularity": 16384, "name": "cp1"}
    assert qemu.nbd_dirty_extents(mid, "cp1") == [(0, SIZE)]
    assert verdicts(report) == {("cp1", "vda"): "ok"}


def test_what_cannot_be_repaired_is_left_for_a_person(host):
    """A v2 top image holds no bitmaps: its checkpoints can only be dropped, the rest is repaired."""
    disks = _domain(host, vda=65536)
    vdb = qemu.create_image(host.images / "vm-vdb.qcow2", SIZE, compat="0.10")
    host.define("vm", [Disk("vda", str(disks["vda"])), Disk("vdb", str(vdb))])
    every = (("vda", "bitmap"), ("vdb", "bitmap"))
    host.checkpoint("vm", "cp1", disks=every)
    host.checkpoint("vm", "cp2", parent="cp1", disks=every)
    qemu.add_bitmap(disks["vda"], "orphan")
    qemu.crash_image(disks["vda"], [(0, MiB)], bitmaps=("cp1", "cp2"))
    before_vdb = sha(vdb)
    result = run(host, "vm", "--repair")
    assert result.exit_code == 2, result.output
    assert "What remains for a person" in result.stdout
    code, report = run_json(host, "vm", "--repair")
    assert code == 2 and report["repair"]["status"] == "nothing-to-do"
    assert verdicts(report) == {
        ("cp1", "vda"): "ok",
        ("cp1", "vdb"): "missing",
        ("cp2", "vda"): "ok",
        ("cp2", "vdb"): "missing",
    }
    remains = [r["command"] for r in report["repair"]["remains"]]
    assert remains == [
        "virsh checkpoint-delete vm cp1 --metadata",
        "virsh checkpoint-delete vm cp2 --metadata",
        f"qemu-img bitmap --remove {disks['vda']} orphan",
    ]
    assert sha(vdb) == before_vdb
    # The orphan was in use too: left as it is, for a person to remove.
    assert qemu.img_bitmaps(disks["vda"])["orphan"]["flags"] == ["in-use", "auto"]


def test_anything_refused_writes_nothing_anywhere(host):
    """vdb's image has the dirty bit (lazy refcounts): recover refuses it, so vda is not written."""
    vda = qemu.create_image(host.images / "vda.qcow2", SIZE)
    vdb = qemu.create_image(host.images / "vdb.qcow2", SIZE, extra_opts=["lazy_refcounts=on"])
    host.define("vm", [Disk("vda", str(vda)), Disk("vdb", str(vdb))])
    host.checkpoint("vm", "cp1", disks=(("vda", "bitmap"), ("vdb", "bitmap")))
    qemu.crash_image(vda, [(0, MiB)], bitmaps=("cp1",))
    qemu.crash_image(vdb, [(0, MiB)], bitmaps=("cp1",))  # killed: the dirty bit stays set
    assert run_json(host, "vm")[0] == 4
    before = sha(vda), sha(vdb)
    code, report = run_json(host, "vm", "--repair")
    assert code == 2, report["repair"]
    assert report["repair"]["status"] == "refused"
    assert "dirty bit" in report["repair"]["message"] and str(vdb) in report["repair"]["message"]
    assert "nothing was written" in report["repair"]["message"]
    assert (sha(vda), sha(vdb)) == before
    assert report["repair"]["images"] == []


def test_a_running_domain_is_left_alone_exit_75(host):
    vda = _domain(host)["vda"]
    qemu.bitmap_op(vda, "cp2", "--disable")
    with qemu.StorageDaemon(vda, writable=True):
        before = sha(vda)
        code, report = run_json(host, "vm", "--repair")
        assert code == 75 and report["repair"]["status"] == "running"
        assert sha(vda) == before


def test_a_dry_run_says_what_would_be_written_and_writes_nothing(host):
    vda = _domain(host)["vda"]
    qemu.crash_image(vda, [(0, MiB)], bitmaps=("cp1", "cp2"))
    before = sha(vda)
    code, report = run_json(host, "vm", "--repair", "--dry-run")
    assert code == 0  # what the real run would exit with
    assert report["repair"]["status"] == "dry-run" and report["repair"]["dry_run"]
    (image,) = report["repair"]["images"]
    assert image["dry_run"] and image["writes"] and image["status"] == "dry-run"
    assert set(verdicts(report).values()) == {"in-use"}  # the diagnosis, unchanged
    assert sha(vda) == before
    real = run_json(host, "vm", "--repair")[1]["repair"]["images"][0]
    assert real["writes"] == image["writes"]


def test_a_reference_marks_only_what_changed(host, tmp_path):
    """In use after a crash: on-disk bits plus what differs from the restore of the last backup."""
    vda = qemu.create_image(host.images / "vda.qcow2", SIZE)
    host.define("vm", [Disk("vda", str(vda))])
    host.checkpoint("vm", "cp1")
    host.checkpoint("vm", "cp2", parent="cp1")
    qemu.add_bitmap(vda, "cp1")
    qemu.qemu_io_write(vda, [(MiB, MiB)], pattern=0x41)  # between cp1 and cp2
    qemu.add_bitmap(vda, "cp2")
    restore = tmp_path / "restore.qcow2"  # the backup taken with cp2
    qemu.qemu_img("convert", "-O", "qcow2", vda, restore)
    qemu.qemu_io_write(vda, [(10 * MiB, 64 * 1024)], pattern=0x42)  # stored at the close
    crash_writes = [(30 * MiB, 4096), (40 * MiB, 8192)]
    qemu.crash_image(vda, crash_writes, bitmaps=("cp1", "cp2"), pattern=0x43)
    code, report = run_json(host, "vm", "--repair", "--reference", f"vda={restore}")
    assert code == 0, report["repair"]
    assert [r[4:6] for r in done(report)] == [("recover", "reference")] * 2
    assert report["repair"]["references"] == {"vda": str(restore)}
    since_cp2 = granules([(10 * MiB, 64 * 1024), (30 * MiB, 4096), (40 * MiB, 8192)], 65536)
    assert qemu.nbd_dirty_extents(vda, "cp2") == since_cp2
    assert qemu.nbd_dirty_extents(vda, "cp1") == merged(*granules([(MiB, MiB)], 65536), *since_cp2)


def test_a_reference_makes_the_newest_missing_bitmap_from_what_changed(host, tmp_path):
    """Killed before the first clean close: both missing; the newest is made from the diff."""
    vda = qemu.create_image(host.images / "vda.qcow2", SIZE)
    qemu.qemu_io_write(vda, [(0, 2 * MiB)], pattern=0x51)
    host.define("vm", [Disk("vda", str(vda))])
    host.checkpoint("vm", "cp1")
    host.checkpoint("vm", "cp2", parent="cp1")
    restore = tmp_path / "restore.raw"
    qemu.qemu_img("convert", "-O", "raw", vda, restore)
    qemu.qemu_io_write(vda, [(5 * MiB, 4096)], pattern=0x52)
    code, report = run_json(host, "vm", "--repair", "--reference", f"vda={restore}")
    assert code == 0, report["repair"]
    assert done(report) == [
        ("cp1", "vda", 0, "missing", "create", "full", 65536),
        ("cp2", "vda", 0, "missing", "create", "reference", 65536),
    ]
    assert qemu.nbd_dirty_extents(vda, "cp1") == [(0, SIZE)]
    assert qemu.nbd_dirty_extents(vda, "cp2") == [(5 * MiB, 65536)]


def test_a_reference_is_not_used_where_the_newest_bitmap_was_never_stored(host, tmp_path):
    """cp2 was made after the last clean close: cp1's stored bits end before it: full."""
    vda = qemu.create_image(host.images / "vda.qcow2", SIZE)
    host.define("vm", [Disk("vda", str(vda))])
    host.checkpoint("vm", "cp1")
    host.checkpoint("vm", "cp2", parent="cp1")
    qemu.add_bitmap(vda, "cp1")
    qemu.crash_image(vda, [(3 * MiB, 4096)], bitmaps=("cp1",))
    restore = tmp_path / "restore.qcow2"
    qemu.qemu_img("convert", "-U", "-O", "qcow2", vda, restore)
    code, report = run_json(host, "vm", "--repair", "--reference", f"vda={restore}")
    assert code == 0, report["repair"]
    assert done(report) == [
        ("cp1", "vda", 0, "in-use", "recover", "full", None),
        ("cp2", "vda", 0, "missing", "create", "reference", 65536),
    ]
    assert qemu.nbd_dirty_extents(vda, "cp1") == [(0, SIZE)]
    assert qemu.nbd_dirty_extents(vda, "cp2") == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("vm", "--reference", "vda=/etc/hostname"), "go with --repair"),
        (("vm", "--dry-run"), "go with --repair"),
        (("--all", "--repair", "--reference", "vda=/etc/hostname"), "not with --all"),
        (("vm", "--repair", "--reference", "/etc/hostname"), "DISK=FILE"),
        (("vm", "--repair", "--reference", "vdz=/etc/hostname"), "has no disk 'vdz'"),
        (("vm", "--repair", "--reference", "vda=/nonexistent"), "is not a file"),
        (
            ("vm", "--repair", "--reference", "vda=/etc/hostname", "--reference", "vda=/etc/hosts"),
            "twice",
        ),
    ],
)
def test_usage_errors(host, args, words):
    vda = _domain(host)["vda"]
    qemu.crash_image(vda, [], bitmaps=("cp1",))
    before = sha(vda)
    result = run(host, *args)
    assert result.exit_code == 64, result.output
    assert words in result.stderr
    assert sha(vda) == before


def test_all_domains_repaired_the_running_one_left_alone(host):
    first = _domain(host, "vm1")["vda"]
    second = _domain(host, "vm2")["vda"]
    for image in (first, second):
        qemu.crash_image(image, [(0, MiB)], bitmaps=("cp1", "cp2"))
    with qemu.StorageDaemon(second, writable=True):
        held = sha(second)
        code, report = run_json(host, "--all", "--repair")
        assert sha(second) == held
    assert code == 75
    by_name = {d["domain"]: d for d in report["domains"]}
    assert by_name["vm1"]["repair"]["status"] == "repaired" and by_name["vm1"]["exit_code"] == 0
    assert by_name["vm2"]["repair"]["status"] == "running" and by_name["vm2"]["exit_code"] == 75
    assert qemu.img_bitmaps(first)["cp2"]["flags"] == ["auto"]


def test_the_human_view_says_what_was_done(host):
    vda = _domain(host)["vda"]
    qemu.crash_image(vda, [(0, MiB)], bitmaps=("cp1", "cp2"))
    result = run(host, "vm", "--repair")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Repair" in out and "recovered (full)" in out
    assert "Result: repaired; every checkpoint usable (exit 0)" in " ".join(out.split())


class _KillAt:
    """A Disk that dies (SimulatedCrash) at write or flush number *at*, counted over every image."""

    def __init__(self, inner, counter: list[int], at: int) -> None:
        self.inner, self.counter, self.at = inner, counter, at

    def _tick(self) -> None:
        if self.counter[0] == self.at:
            raise SimulatedCrash(f"killed at operation {self.at}")
        self.counter[0] += 1

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._tick()
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._tick()
        self.inner.flush()

    def size(self) -> int:
        return self.inner.size()


def test_a_kill_anywhere_in_a_repair_of_two_images_is_finished_by_the_next(host, monkeypatch):
    import shutil

    import qbitmap.libvirt.repair as repair_module
    from qbitmap.libvirt import read_domain
    from qbitmap.libvirt.verdicts import examine_domain

    disks = _domain(host, vda=65536, vdb=4096)
    qemu.crash_image(disks["vda"], [(20 * MiB, MiB)], bitmaps=("cp1", "cp2"))
    qemu.bitmap_op(disks["vdb"], "cp2", "--remove")
    templates = {t: host.root / f"{t}.template" for t in disks}
    for target, path in disks.items():
        shutil.copyfile(path, templates[target])
    real_prepare = repair_module.prepare
    definition = read_domain(host.config_dir / "vm.xml")

    def repair_killed_at(at: int | None) -> list[int]:
        counter = [0]

        def prepare(path, options, **kwargs):
            return real_prepare(
                path, options, disk_wrapper=lambda d: _KillAt(d, counter, at), **kwargs
            )

        monkeypatch.setattr(repair_module, "prepare", prepare)
        try:
            before = examine_domain(definition, checkpoint_dir=host.checkpoint_dir)
            repair_module.repair_domain(definition, before, checkpoint_dir=host.checkpoint_dir)
        finally:
            monkeypatch.setattr(repair_module, "prepare", real_prepare)
        return counter

    total = repair_killed_at(None)[0]
    assert total >= 10
    for at in range(total):
        for target, path in disks.items():
            shutil.copyfile(templates[target], path)
        with pytest.raises(SimulatedCrash):
            repair_killed_at(at)
        for path in disks.values():
            rc, check = qemu.img_check(path)
            assert check.get("corruptions", 0) == 0 and rc in (0, 3), (at, check)
        code, report = run_json(host, "vm", "--repair")
        assert code == 0, (at, report["repair"])
        assert set(verdicts(report).values()) == {"ok"}, at
        for path in disks.values():
            # A kill after an image's commit leaves it repaired with leaked clusters, which
            # the next --repair does not visit: recover frees them, as the man page says.
            rc, check = qemu.img_check(path)
            assert check.get("corruptions", 0) == 0 and rc in (0, 3), (at, check)
            if rc == 3:
                freed = recover(path, Options())
                assert freed.status == "leaks-reclaimed", (at, freed.status)
            assert qemu.img_check(path)[0] == 0, at
        for target, name in (("vda", "cp1"), ("vda", "cp2"), ("vdb", "cp2")):  # the repaired
            assert qemu.nbd_dirty_extents(disks[target], name) == [(0, SIZE)], (at, target, name)
