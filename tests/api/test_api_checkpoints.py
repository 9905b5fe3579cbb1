"""``qbitmap.checkpoints`` returns the report ``qbitmap checkpoints --json DOMAIN`` prints.

On a synthetic libvirt host (libvirt's own files as libvirt 9.0 writes them,
tests/libvirt_files.py) with disks made, written and crashed by
QEMU's tools; the verdicts themselves are proven against a real libvirtd in
tests/libvirt/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qemu
from click.testing import CliRunner
from libvirt_files import Disk, Host

import qbitmap
from qbitmap.cli import cli


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """Domain 'vm' with two qcow2 disks and checkpoints cp1, cp2 on both."""
    qemu.require_tools("qemu-img", "qemu-io")
    host = Host(tmp_path)
    vda = qemu.create_image(host.images / "vda.qcow2", 64 << 20)
    vdb = qemu.create_image(host.images / "vdb.qcow2", 64 << 20)
    host.define("vm", [Disk("vda", str(vda)), Disk("vdb", str(vdb))])
    both = (("vda", "bitmap"), ("vdb", "bitmap"))
    host.checkpoint("vm", "cp1", disks=both)
    host.checkpoint("vm", "cp2", parent="cp1", disks=both)
    for image in (vda, vdb):
        qemu.add_bitmap(image, "cp1")
        qemu.add_bitmap(image, "cp2")
    return host


def cli_json(*args: str | Path) -> tuple[int, dict]:
    result = CliRunner().invoke(
        cli, ["checkpoints", "--json", *map(str, args)], catch_exceptions=False
    )
    return result.exit_code, json.loads(result.stdout)


def assert_same_report(report: qbitmap.CheckpointsReport, code: int, document: dict) -> None:
    assert report.to_dict() == document
    assert report.exit_code == code == document["exit_code"]
    assert (report.domain, report.running) == (document["domain"], document["running"])
    assert [
        (c.name, c.parent, c.verdict, [(d.disk, d.bitmap, d.verdict, d.reason, d.repairable)
                                       for d in c.disks])
        for c in report.checkpoints
    ] == [
        (c["name"], c["parent"], c["verdict"], [
            (d["disk"], d["bitmap"], d["verdict"], d["reason"], d["repairable"])
            for d in c["disks"]
        ])
        for c in document["checkpoints"]
    ]  # fmt: skip
    assert list(report.remedies) == [r["command"] for r in document["remedies"]]
    assert list(report.errors) == [f["message"] for f in document["findings"]]


def test_a_healthy_domain(host: Host) -> None:
    report = qbitmap.checkpoints(
        "vm", config_dir=host.config_dir, checkpoint_dir=host.checkpoint_dir
    )
    assert_same_report(report, *cli_json(*host.args(), "vm"))
    assert report.exit_code == 0 and [c.name for c in report.checkpoints] == ["cp1", "cp2"]
    assert {d.verdict for c in report.checkpoints for d in c.disks} == {"ok"}


def test_a_crashed_disk_and_a_missing_bitmap(host: Host) -> None:
    qemu.crash_image(host.images / "vda.qcow2", [(0, 1 << 20)], bitmaps=("cp1", "cp2"))
    qemu.bitmap_op(host.images / "vdb.qcow2", "cp2", "--remove")
    report = qbitmap.checkpoints(
        "vm", config_dir=host.config_dir, checkpoint_dir=host.checkpoint_dir
    )
    assert_same_report(report, *cli_json(*host.args(), "vm"))
    assert report.exit_code == qbitmap.ExitCode.IN_USE
    assert {(c.name, d.disk): d.verdict for c in report.checkpoints for d in c.disks} == {
        ("cp1", "vda"): "in-use",
        ("cp1", "vdb"): "ok",
        ("cp2", "vda"): "in-use",
        ("cp2", "vdb"): "missing",
    }
    assert f"qbitmap recover --mode full {host.images / 'vda.qcow2'}" in report.remedies


def test_a_running_domain_is_not_judged(host: Host) -> None:
    qemu.require_tools("qemu-storage-daemon")
    with qemu.StorageDaemon(host.images / "vda.qcow2"):
        report = qbitmap.checkpoints(
            "vm", config_dir=host.config_dir, checkpoint_dir=host.checkpoint_dir
        )
        assert_same_report(report, *cli_json(*host.args(), "vm"))
    assert report.running and report.exit_code == qbitmap.ExitCode.BUSY


def test_a_domain_xml_file(host: Host, tmp_path: Path) -> None:
    definition = host.config_dir / "vm.xml"
    report = qbitmap.checkpoints(domain_xml=definition, checkpoint_dir=host.checkpoint_dir)
    args = ["--domain-xml", definition, "--checkpoint-dir", host.checkpoint_dir]
    assert_same_report(report, *cli_json(*args))
    named = qbitmap.checkpoints("vm", domain_xml=definition, checkpoint_dir=host.checkpoint_dir)
    assert named.to_dict() == report.to_dict()
    broken = tmp_path / "broken.xml"
    broken.write_text("<domain><name>vm</name>")
    report = qbitmap.checkpoints(domain_xml=broken, checkpoint_dir=host.checkpoint_dir)
    assert_same_report(
        report, *cli_json("--domain-xml", broken, "--checkpoint-dir", host.checkpoint_dir)
    )
    assert report.exit_code == 1 and report.errors and str(broken) in report.errors[0]


def test_usage_errors_and_a_host_without_libvirt(host: Host, tmp_path: Path) -> None:
    where = {"config_dir": host.config_dir, "checkpoint_dir": host.checkpoint_dir}
    cases = [
        ((), {}, "name a domain"),
        (("nope",), where, "no domain named 'nope'"),
        (("../vm",), where, "is not a domain name"),
        (("other",), {"domain_xml": host.config_dir / "vm.xml"}, "defines domain 'vm'"),
    ]
    for args, kwargs, words in cases:
        with pytest.raises(qbitmap.UsageError, match=words) as caught:
            qbitmap.checkpoints(*args, **kwargs)
        assert caught.value.exit_code == 64
    with pytest.raises(qbitmap.ImageIOError, match="no such directory") as caught:
        qbitmap.checkpoints("vm", config_dir=tmp_path / "nowhere")
    assert caught.value.exit_code == 1
    result = CliRunner().invoke(
        cli, ["checkpoints", "--config-dir", str(tmp_path / "nowhere"), "vm"]
    )
    assert result.exit_code == 1


def test_the_default_directories_are_libvirts() -> None:
    import inspect

    from qbitmap.libvirt import DEFAULT_CHECKPOINT_DIR, DEFAULT_CONFIG_DIR

    defaults = inspect.signature(qbitmap.checkpoints).parameters
    assert Path(defaults["config_dir"].default) == DEFAULT_CONFIG_DIR
    assert Path(defaults["checkpoint_dir"].default) == DEFAULT_CHECKPOINT_DIR
