"""qbitmap's verdicts against libvirt's own, on a real libvirtd and real crashes.

Each scenario breaks checkpoints for real (SIGKILL of the domain's QEMU, a
disk-only snapshot, qemu-img bitmap, virsh checkpoint-delete --metadata),
then asks both: ``qbitmap checkpoints`` on the shut-off domain, and libvirt
on the restarted one (``virsh backup-begin`` with ``<incremental>``, which
must start or fail with libvirt's "checkpoint inconsistent" error, and
``checkpoint-create --redefine --redefine-validate``, which must agree).
"""

from __future__ import annotations

import subprocess

import qemu
from click.testing import CliRunner
from libvirt_harness import (
    INCONSISTENT,
    TestDomain,
    qbitmap_checkpoints,
    qbitmap_verdicts,
    virsh,
)

from qbitmap.cli import cli

MiB = 1 << 20
DISK_SIZE = 256 * MiB


def libvirt_verdicts(domain: TestDomain, names: list[str]) -> dict[str, str | None]:
    """libvirt's answer per checkpoint on the running domain: None (accepted) or its error."""
    domain.start()
    try:
        out = {}
        for name in names:
            accepted, error = domain.libvirt_accepts(name)
            out[name] = None if accepted else error
        return out
    finally:
        domain.stop_cleanly()


def assert_agree(domain: TestDomain, expected: dict[str, str]) -> None:
    """qbitmap says *expected* (checkpoint -> verdict) and libvirt agrees, checkpoint by checkpoint."""
    ours = qbitmap_verdicts(domain)
    assert ours == expected
    theirs = libvirt_verdicts(domain, list(expected))
    for name, verdict in expected.items():
        if verdict == "ok":
            assert theirs[name] is None, (name, theirs[name])
        else:
            assert theirs[name] == INCONSISTENT.format(name=name, disk="vda"), (name, theirs[name])


def two_checkpoints(domain: TestDomain) -> None:
    """cp1, a write, cp2, a write; then a clean stop so that QEMU stores both bitmaps."""
    domain.start()
    domain.checkpoint("cp1")
    domain.write("50M", "1M")
    domain.checkpoint("cp2")
    domain.write("100M", "1M", pattern=8)
    domain.stop_cleanly()


def test_healthy_checkpoints_agree(domain):
    two_checkpoints(domain)
    code, _report = qbitmap_checkpoints(domain)
    assert code == 0
    assert_agree(domain, {"cp1": "ok", "cp2": "ok"})


def test_running_domain_is_left_to_libvirt(domain):
    two_checkpoints(domain)
    domain.start()
    try:
        code, report = qbitmap_checkpoints(domain)
    finally:
        domain.stop_cleanly()
    assert code == 75 and report["running"]
    assert {d["verdict"] for c in report["checkpoints"] for d in c["disks"]} == {"running"}


def test_sigkill_after_a_clean_restart_leaves_them_in_use(domain):
    two_checkpoints(domain)
    domain.start()
    domain.write("150M", "1M", pattern=9)
    domain.kill()
    code, _report = qbitmap_checkpoints(domain)
    assert code == 4
    assert_agree(domain, {"cp1": "in-use", "cp2": "in-use"})
    # libvirt's own start and clean stop above do not change that: still in use.
    assert qbitmap_verdicts(domain) == {"cp1": "in-use", "cp2": "in-use"}


def test_sigkill_before_the_first_clean_close_leaves_them_missing(domain):
    domain.start()
    domain.checkpoint("cp1")
    domain.write("50M", "1M")
    domain.checkpoint("cp2")
    domain.kill()
    assert qemu.img_bitmaps(domain.disks["vda"]) == {}
    assert_agree(domain, {"cp1": "missing", "cp2": "missing"})
    # A checkpoint made after the crash is fine; the two old ones stay missing.
    domain.start()
    domain.checkpoint("cp3")
    domain.stop_cleanly()
    assert_agree(domain, {"cp1": "missing", "cp2": "missing", "cp3": "ok"})


def test_disk_only_snapshot_then_a_crash(domain, tmp_path):
    two_checkpoints(domain)
    base = domain.disks["vda"]
    overlay = tmp_path / f"{domain.name}-vda.s1.qcow2"
    domain.start()
    domain.snapshot_disk_only("s1", {"vda": overlay})
    # libvirt gives the overlay recording bitmaps of the same names, in QEMU's memory.
    nodes = domain.node_bitmaps()
    assert {name for name, _rec, _inc in nodes[str(overlay)]} == {"cp1", "cp2"}
    # ... while the base, read-only from now on, has them stored, recording and not in use.
    assert {n: b["flags"] for n, b in qemu.img_bitmaps(base).items()} == {
        "cp1": ["auto"],
        "cp2": ["auto"],
    }
    domain.write("200M", "1M")
    domain.kill()
    assert qemu.img_bitmaps(overlay) == {}
    report = qbitmap_checkpoints(domain)[1]
    chain = report["disks"][0]["backing_chain"]
    assert [x["filename"] for x in chain] == [str(overlay), str(base)]
    assert_agree(domain, {"cp1": "missing", "cp2": "missing"})


def test_disk_only_snapshot_then_a_clean_stop_is_two_consecutive_layers(domain, tmp_path):
    two_checkpoints(domain)
    overlay = tmp_path / f"{domain.name}-vda.s1.qcow2"
    domain.start()
    domain.snapshot_disk_only("s1", {"vda": overlay})
    domain.stop_cleanly()
    report = qbitmap_checkpoints(domain)[1]
    (cp1,) = [c for c in report["checkpoints"] if c["name"] == "cp1"]
    assert cp1["disks"][0]["chain"]["present_in"] == [0, 1]
    assert_agree(domain, {"cp1": "ok", "cp2": "ok"})


def test_a_bitmap_disabled_with_qemu_img(domain):
    two_checkpoints(domain)
    qemu.bitmap_op(domain.disks["vda"], "cp1", "--disable")
    assert_agree(domain, {"cp1": "not-recording", "cp2": "ok"})


def test_a_bitmap_removed_with_qemu_img(domain):
    two_checkpoints(domain)
    qemu.bitmap_op(domain.disks["vda"], "cp2", "--remove")
    assert_agree(domain, {"cp1": "ok", "cp2": "missing"})


def test_a_bitmap_removed_from_a_middle_layer_is_a_gap(domain, tmp_path):
    two_checkpoints(domain)
    base = domain.disks["vda"]
    for i in (1, 2):
        domain.start()
        domain.snapshot_disk_only(f"s{i}", {"vda": tmp_path / f"{domain.name}-vda.s{i}.qcow2"})
        domain.stop_cleanly()
    middle = tmp_path / f"{domain.name}-vda.s1.qcow2"
    qemu.bitmap_op(middle, "cp1", "--remove")
    report = qbitmap_checkpoints(domain)[1]
    assert len(report["disks"][0]["backing_chain"]) == 3
    assert report["disks"][0]["backing_chain"][2]["filename"] == str(base)
    assert_agree(domain, {"cp1": "gap", "cp2": "ok"})


def test_checkpoint_metadata_deleted_leaves_an_orphan(domain):
    two_checkpoints(domain)
    virsh("checkpoint-delete", domain.name, "cp1", "--metadata")
    code, report = qbitmap_checkpoints(domain)
    assert code == 0
    assert [c["name"] for c in report["checkpoints"]] == ["cp2"]
    assert [(o["bitmap"], o["disk"]) for o in report["orphans"]] == [("cp1", "vda")]
    remove = f"qemu-img bitmap --remove {domain.disks['vda']} cp1"
    assert remove in [r["command"] for r in report["remedies"]]
    domain.start()
    try:
        proc = domain.backup_begin("cp1")
        assert proc.returncode != 0
        assert "Checkpoint 'cp1' for incremental backup of disk 'vda' not found" in proc.stderr
        again = virsh("checkpoint-create-as", domain.name, "cp1", check=False)
        assert again.returncode != 0 and "Bitmap already exists: cp1" in again.stderr
    finally:
        domain.stop_cleanly()
    # The remedy qbitmap names makes the name usable again.
    subprocess.run(remove.split(), check=True, timeout=60)
    domain.start()
    try:
        domain.checkpoint("cp1")
    finally:
        domain.stop_cleanly()
    assert qbitmap_verdicts(domain) == {"cp1": "ok", "cp2": "ok"}


def test_the_reproduction_recover_full_then_the_backup_covers_the_disk(domain):
    """The issue's reproduction: two checkpoints, SIGKILL, libvirt's error, recover, backup."""
    two_checkpoints(domain)
    domain.start()
    domain.kill()
    domain.start()
    try:
        proc = domain.backup_begin("cp2")
        assert proc.returncode == 1
        assert proc.stderr.strip() == (
            "error: checkpoint inconsistent: missing or broken bitmap 'cp2' for disk 'vda'"
        )
    finally:
        domain.stop_cleanly()
    code, report = qbitmap_checkpoints(domain)
    assert code == 4
    vda = str(domain.disks["vda"])
    assert f"qbitmap recover --mode full {vda}" in [r["command"] for r in report["remedies"]]
    recovered = CliRunner().invoke(cli, ["recover", "--mode", "full", vda], catch_exceptions=False)
    assert recovered.exit_code == 0, recovered.output
    assert qbitmap_verdicts(domain) == {"cp1": "ok", "cp2": "ok"}
    domain.start()
    try:
        proc = domain.backup_begin("cp2")
        assert proc.returncode == 0, proc.stderr
        extents = domain.dirty_map(proc.socket)
        assert [(e["offset"], e["length"], e["description"]) for e in extents] == [
            (0, DISK_SIZE, "dirty")
        ]
        assert proc.scratch.exists()
        domain.abort_backup()
        assert not proc.scratch.exists()  # libvirt deletes a pull backup's scratch file
    finally:
        domain.stop_cleanly()


def test_libvirts_checkpoint_bitmaps_get_qemus_default_granularity(libvirtd, tmp_path):
    """What a repair that creates a missing bitmap must match (see qemu_default_granularity)."""
    from qbitmap.check.chain import qemu_default_granularity

    dom = TestDomain(tmp_path, disks=("vda", "vdb"))
    sizes = {"vda": 512, "vdb": 2 << 20}
    for target, cluster_size in sizes.items():
        qemu.create_image(dom.disks[target], "256M", cluster_size=cluster_size)
    try:
        dom.define()
        dom.start()
        dom.checkpoint("cp1")
        dom.stop_cleanly()
        for target, cluster_size in sizes.items():
            granularity = qemu.img_bitmaps(dom.disks[target])["cp1"]["granularity"]
            assert granularity == qemu_default_granularity(cluster_size), target
        assert qemu_default_granularity(512) == 4096
        assert qemu_default_granularity(2 << 20) == 65536
    finally:
        TestDomain.remove(dom.name)
