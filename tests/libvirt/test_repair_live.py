"""checkpoints --repair proven against libvirt itself: after it, libvirt's backups start and cover.

Each scenario of test_libvirt_live.py breaks checkpoints for real (SIGKILL
after a clean restart, SIGKILL before the first clean close, a disk-only
snapshot then a crash, ``qemu-img bitmap --disable`` and ``--remove`` in
the top image and in a middle layer, ``checkpoint-delete --metadata``);
libvirt's refusal of them is proven there.  Here ``qbitmap checkpoints
--repair`` runs on the shut-off domain, then libvirt starts a pull-mode
backup from every repaired checkpoint (``virsh backup-begin`` with
``<incremental>``) and the dirty map it exports (``nbdinfo
--map=qemu:dirty-bitmap:backup-vda``) must cover every guest write made
since that checkpoint.  What cannot be repaired is reported as such, and
libvirt still refuses it.
"""

from __future__ import annotations

import qemu
from libvirt_harness import INCONSISTENT, TestDomain, qbitmap_repair, qbitmap_verdicts, virsh

MiB = 1 << 20
DISK_SIZE = 256 * MiB


def covers(extents: list[tuple[int, int]], writes: list[tuple[int, int]]) -> bool:
    merged = qemu.merge_extents(extents)
    return all(any(s <= o and o + n <= s + m for s, m in merged) for o, n in writes)


class Writes:
    """Guest writes, and for each checkpoint the ones made since it."""

    def __init__(self, domain: TestDomain) -> None:
        self.domain = domain
        self.since: dict[str, list[tuple[int, int]]] = {}

    def checkpoint(self, name: str) -> None:
        self.domain.checkpoint(name)
        self.since[name] = []

    def write(self, offset_mib: int, length_mib: int = 1, *, pattern: int = 7) -> None:
        self.domain.write(f"{offset_mib}M", f"{length_mib}M", pattern=pattern)
        self.domain.flush()  # what was written survives the kills below
        for writes in self.since.values():
            writes.append((offset_mib * MiB, length_mib * MiB))


def two_checkpoints(domain: TestDomain) -> Writes:
    """cp1, a write, cp2, a write; then a clean stop so that QEMU stores both bitmaps."""
    w = Writes(domain)
    domain.start()
    w.checkpoint("cp1")
    w.write(50)
    w.checkpoint("cp2")
    w.write(100, pattern=8)
    domain.stop_cleanly()
    return w


def repair_and_check(domain: TestDomain, w: Writes, repaired: dict[str, str]) -> dict:
    """--repair fixes *repaired* (checkpoint -> verdict before, the others ok); libvirt's
    backups from every checkpoint then cover the writes since it."""
    assert qbitmap_verdicts(domain) == {name: repaired.get(name, "ok") for name in w.since}
    code, report = qbitmap_repair(domain)
    assert code == 0, report["repair"]
    assert report["repair"]["status"] == "repaired"
    assert {r["checkpoint"] for r in report["repair"]["repairs"]} == set(repaired)
    assert {r["problem"] for r in report["repair"]["repairs"]} == set(repaired.values())
    assert qbitmap_verdicts(domain) == {name: "ok" for name in w.since}
    assert_backups_cover(domain, w.since)
    return report


def assert_backups_cover(domain: TestDomain, since: dict[str, list[tuple[int, int]]]) -> None:
    """libvirt starts a backup from each checkpoint, and its dirty map covers the writes since."""
    domain.start()
    try:
        for name, writes in since.items():
            assert writes, name
            accepted, error = domain.libvirt_accepts(name)  # also --redefine-validate
            assert accepted, (name, error)
            proc = domain.backup_begin(name)
            assert proc.returncode == 0, proc.stderr
            try:
                extents = domain.dirty_map(proc.socket)
            finally:
                domain.abort_backup()
            dirty = [(e["offset"], e["length"]) for e in extents if e["description"] == "dirty"]
            assert covers(dirty, writes), (name, dirty, writes)
    finally:
        domain.stop_cleanly()


def test_in_use_after_a_sigkill_following_a_clean_restart(domain):
    w = two_checkpoints(domain)
    domain.start()
    w.write(150, pattern=9)
    domain.kill()
    report = repair_and_check(domain, w, {"cp1": "in-use", "cp2": "in-use"})
    assert {(r["action"], r["mode"]) for r in report["repair"]["repairs"]} == {("recover", "full")}


def test_missing_after_a_sigkill_before_the_first_clean_close(domain):
    w = Writes(domain)
    domain.start()
    w.checkpoint("cp1")
    w.write(50)
    w.checkpoint("cp2")
    w.write(60)
    domain.kill()
    assert qemu.img_bitmaps(domain.disks["vda"]) == {}
    report = repair_and_check(domain, w, {"cp1": "missing", "cp2": "missing"})
    # The granularity QEMU gives libvirt's own checkpoint bitmaps on this disk.
    assert {r["granularity"] for r in report["repair"]["repairs"]} == {65536}
    assert {n: b["granularity"] for n, b in qemu.img_bitmaps(domain.disks["vda"]).items()} == {
        "cp1": 65536,
        "cp2": 65536,
    }


def test_a_disk_only_snapshot_then_a_crash(domain, tmp_path):
    w = two_checkpoints(domain)
    overlay = tmp_path / f"{domain.name}-vda.s1.qcow2"
    domain.start()
    domain.snapshot_disk_only("s1", {"vda": overlay})
    w.write(200)
    domain.kill()
    report = repair_and_check(domain, w, {"cp1": "missing", "cp2": "missing"})
    assert {(r["layer"], r["filename"]) for r in report["repair"]["repairs"]} == {(0, str(overlay))}


def test_a_bitmap_disabled_with_qemu_img(domain):
    w = two_checkpoints(domain)
    qemu.bitmap_op(domain.disks["vda"], "cp1", "--disable")
    domain.start()
    w.write(150, pattern=9)  # cp1 does not record it
    domain.stop_cleanly()
    report = repair_and_check(domain, w, {"cp1": "not-recording"})
    assert [r["action"] for r in report["repair"]["repairs"]] == ["enable"]


def test_a_bitmap_removed_with_qemu_img(domain):
    w = two_checkpoints(domain)
    qemu.bitmap_op(domain.disks["vda"], "cp2", "--remove")
    repair_and_check(domain, w, {"cp2": "missing"})


def test_a_bitmap_removed_from_a_middle_layer(domain, tmp_path):
    w = two_checkpoints(domain)
    for i in (1, 2):
        domain.start()
        domain.snapshot_disk_only(f"s{i}", {"vda": tmp_path / f"{domain.name}-vda.s{i}.qcow2"})
        w.write(100 + 20 * i)
        domain.stop_cleanly()
    middle = tmp_path / f"{domain.name}-vda.s1.qcow2"
    qemu.bitmap_op(middle, "cp1", "--remove")
    report = repair_and_check(domain, w, {"cp1": "gap"})
    assert [(r["layer"], r["action"]) for r in report["repair"]["repairs"]] == [(1, "create")]


def test_deleted_metadata_is_left_for_a_person_and_libvirt_still_refuses_it(domain):
    """An orphan bitmap is no repair's business: reported, with its remedy; the rest repaired."""
    w = two_checkpoints(domain)
    virsh("checkpoint-delete", domain.name, "cp1", "--metadata")
    domain.start()
    w.write(150)
    domain.kill()  # cp2 (and the orphan cp1) left in use
    code, report = qbitmap_repair(domain)
    assert code == 0, report["repair"]
    assert [(r["checkpoint"], r["problem"]) for r in report["repair"]["repairs"]] == [
        ("cp2", "in-use")
    ]
    assert [(o["bitmap"], o["status"]) for o in report["orphans"]] == [("cp1", "in-use")]
    remove = f"qemu-img bitmap --remove {domain.disks['vda']} cp1"
    assert [r["command"] for r in report["repair"]["remains"]] == [remove]
    assert_backups_cover(domain, {"cp2": w.since["cp2"]})
    domain.start()
    try:
        proc = domain.backup_begin("cp1")
        assert proc.returncode != 0
        assert "Checkpoint 'cp1' for incremental backup of disk 'vda' not found" in proc.stderr
    finally:
        domain.stop_cleanly()


def test_a_checkpoint_no_repair_can_save_is_reported_and_libvirt_refuses_it(domain, tmp_path):
    """A version 2 overlay holds no bitmaps: cp1 and cp2 can only be dropped; libvirt refuses."""
    two_checkpoints(domain)
    base = domain.disks["vda"]
    overlay = tmp_path / f"{domain.name}-vda.v2.qcow2"
    qemu.create_image(overlay, None, compat="0.10", backing=base)
    xml = virsh("dumpxml", "--inactive", domain.name).stdout
    assert f"<source file='{base}'/>" in xml
    definition = tmp_path / "v2.xml"
    definition.write_text(xml.replace(f"<source file='{base}'/>", f"<source file='{overlay}'/>"))
    virsh("define", definition)
    before = qemu.img_bitmaps(base)
    code, report = qbitmap_repair(domain)
    assert code == 2, report["repair"]
    assert report["repair"]["status"] == "nothing-to-do" and report["repair"]["repairs"] == []
    verdicts = {
        (c["name"], d["verdict"], d["repairable"])
        for c in report["checkpoints"]
        for d in c["disks"]
    }
    assert verdicts == {("cp1", "missing", False), ("cp2", "missing", False)}
    assert [r["command"] for r in report["repair"]["remains"]] == [
        f"virsh checkpoint-delete {domain.name} cp1 --metadata",
        f"qemu-img bitmap --remove {base} cp1",
        f"virsh checkpoint-delete {domain.name} cp2 --metadata",
        f"qemu-img bitmap --remove {base} cp2",
    ]
    assert qemu.img_bitmaps(base) == before
    domain.start()
    try:
        for name in ("cp1", "cp2"):
            accepted, error = domain.libvirt_accepts(name)
            assert not accepted and error == INCONSISTENT.format(name=name, disk="vda")
    finally:
        domain.stop_cleanly()
