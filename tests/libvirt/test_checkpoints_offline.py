"""qbitmap checkpoints on a synthetic libvirt host: libvirt's files, images made by QEMU's tools.

The verdicts themselves are proven against a real libvirtd in
test_libvirt_live.py; here every branch is exercised quickly and without a
daemon, including files no libvirt would write.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import qemu
from click.testing import CliRunner
from libvirt_files import FIXTURES, Disk, Host

from qbitmap.cli import cli
from qbitmap.libvirt import read_checkpoint, read_domain


def run(*args: str | Path):
    result = CliRunner().invoke(cli, ["checkpoints", *map(str, args)], catch_exceptions=False)
    return result


def run_json(host: Host, *args: str | Path) -> tuple[int, dict]:
    result = run(*host.args(), "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def verdicts(report: dict) -> dict[tuple[str, str], str]:
    return {(c["name"], d["disk"]): d["verdict"] for c in report["checkpoints"] for d in c["disks"]}


def commands(report: dict) -> list[str]:
    return [r["command"] for r in report["remedies"]]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def vm(host: Host) -> tuple[Path, Path]:
    """Domain 'vm' with two qcow2 disks and checkpoints cp1, cp2 on both, all healthy."""
    qemu.require_tools("qemu-img", "qemu-io")
    vda = qemu.create_image(host.images / "vda.qcow2", 64 << 20)
    vdb = qemu.create_image(host.images / "vdb.qcow2", 64 << 20)
    host.define("vm", [Disk("vda", str(vda)), Disk("vdb", str(vdb))])
    both = (("vda", "bitmap"), ("vdb", "bitmap"))
    host.checkpoint("vm", "cp1", disks=both)
    host.checkpoint("vm", "cp2", parent="cp1", disks=both)
    for image in (vda, vdb):
        qemu.add_bitmap(image, "cp1")
        qemu.add_bitmap(image, "cp2")
    return vda, vdb


# -- the real files parse -------------------------------------------------------------------


def test_libvirts_own_files_parse():
    domain = read_domain(FIXTURES / "vm1.xml")
    assert domain.name == "vm1" and domain.running_id is None
    (disk,) = domain.disks
    assert (disk.target, disk.type, disk.format, disk.source) == (
        "vda",
        "file",
        "qcow2",
        "/var/lib/libvirt/images/vm1.qcow2",
    )
    live = read_domain(FIXTURES / "vm1-dumpxml-running.xml")
    assert live.running_id is not None and live.disks == domain.disks
    cp = read_checkpoint(FIXTURES / "cp2.xml")
    assert (cp.name, cp.parent, cp.current) == ("cp2", "cp1", False)
    assert [(d.name, d.checkpoint, d.bitmap) for d in cp.disks] == [("vda", "bitmap", "cp2")]
    assert cp.domain is not None and cp.domain.disks == domain.disks


# -- verdicts -------------------------------------------------------------------------------


def test_healthy_domain_exit_0(host, vm):
    code, report = run_json(host, "vm")
    assert code == report["exit_code"] == 0
    assert set(verdicts(report).values()) == {"ok"}
    assert [c["name"] for c in report["checkpoints"]] == ["cp1", "cp2"]
    assert report["remedies"] == [] and report["orphans"] == [] and report["findings"] == []
    assert report["domain"] == "vm" and report["running"] is False
    assert {d["target"] for d in report["disks"]} == {"vda", "vdb"}


def test_in_use_after_a_crash_is_repairable_exit_4(host, vm):
    vda, _vdb = vm
    qemu.crash_image(vda, [(0, 1 << 20)], bitmaps=("cp1", "cp2"))
    code, report = run_json(host, "vm")
    assert code == 4
    assert verdicts(report) == {
        ("cp1", "vda"): "in-use",
        ("cp1", "vdb"): "ok",
        ("cp2", "vda"): "in-use",
        ("cp2", "vdb"): "ok",
    }
    cmds = commands(report)
    assert f"qbitmap recover --mode full {vda}" in cmds
    repair = [r for r in report["remedies"] if r["argv"][:2] == ["qbitmap", "checkpoints"]]
    # The same files as this run: pasted, the line repairs what was diagnosed.
    assert repair
    assert repair[0]["argv"] == ["qbitmap", "checkpoints", "vm", "--repair", *host.args()]
    assert not any("checkpoint-delete" in c for c in cmds)  # in-use is not a metadata problem
    (cp1,) = [c for c in report["checkpoints"] if c["name"] == "cp1"]
    chain = cp1["disks"][0]["chain"]
    assert chain["problems"] == [
        {
            "kind": "in-use",
            "index": 0,
            "filename": str(vda),
            "detail": chain["problems"][0]["detail"],
            "repairable": True,
            "granularity": None,
        }
    ]


def test_checkpoint_metadata_without_a_bitmap_is_missing(host, vm):
    _vda, _vdb = vm
    host.checkpoint("vm", "cp3", parent="cp2", disks=(("vda", "bitmap"), ("vdb", "bitmap")))
    code, report = run_json(host, "vm")
    assert code == 4
    assert verdicts(report)[("cp3", "vda")] == "missing"
    assert "virsh checkpoint-delete vm cp3 --metadata" in commands(report)


def test_gap_and_not_recording_in_a_chain(host, tmp_path):
    base = qemu.create_image(host.images / "base.qcow2", 64 << 20)
    top = host.images / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    mid_top = host.images / "top2.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", mid_top)
    host.define("vm", [Disk("vda", str(mid_top))])
    host.checkpoint("vm", "cp1")
    host.checkpoint("vm", "cp2", parent="cp1")
    for image in (mid_top, base):
        qemu.add_bitmap(image, "cp1")
    qemu.add_bitmap(mid_top, "cp2", disabled=True)
    code, report = run_json(host, "vm")
    assert code == 4
    assert verdicts(report) == {("cp1", "vda"): "gap", ("cp2", "vda"): "not-recording"}
    cmds = commands(report)
    assert f"qemu-img bitmap --remove {base} cp1" in cmds
    assert f"qemu-img bitmap --remove {mid_top} cp1" in cmds
    disk = report["disks"][0]
    assert [x["filename"] for x in disk["backing_chain"]] == [str(mid_top), str(top), str(base)]


def test_corrupt_bitmap_is_not_repairable_exit_2(host, vm):
    _vda, vdb = vm
    qemu.qemu_io(vdb, "write 0 64k")
    entry = next(e for e in qemu.bitmap_directory(vdb) if e["name"] == "cp1")
    with open(vdb, "r+b") as f:
        f.seek(entry["table_offset"])
        f.write(struct.pack(">Q", 0x12345600))
    code, report = run_json(host, "vm")
    assert code == 2
    assert verdicts(report)[("cp1", "vdb")] == "corrupt"
    cmds = commands(report)
    assert f"qbitmap check {vdb}" in cmds
    assert f"qbitmap recover --drop-broken {vdb}" in cmds
    assert "virsh checkpoint-delete vm cp1 --metadata" in cmds


def test_missing_disk_image_is_unreadable_exit_1(host, vm):
    _vda, vdb = vm
    os.unlink(vdb)
    code, report = run_json(host, "vm")
    assert code == 1
    assert verdicts(report)[("cp1", "vdb")] == "unreadable"
    assert "No such file" in report["checkpoints"][0]["disks"][1]["reason"]
    assert verdicts(report)[("cp1", "vda")] == "ok"


def test_orphan_bitmaps_are_listed_with_their_remedy(host, vm):
    vda, _vdb = vm
    qemu.add_bitmap(vda, "virtnbdbackup.7")
    code, report = run_json(host, "vm")
    assert code == 0  # no checkpoint is unusable
    assert report["orphans"] == [
        {
            "disk": "vda",
            "layer": 0,
            "filename": str(vda),
            "bitmap": "virtnbdbackup.7",
            "status": "consistent",
            "flags": ["auto"],
        }
    ]
    assert commands(report) == [f"qemu-img bitmap --remove {vda} virtnbdbackup.7"]


def test_a_checkpoint_whose_disk_is_gone(host, vm):
    vda, _vdb = vm
    host.define("vm", [Disk("vda", str(vda))])  # vdb detached since
    code, report = run_json(host, "vm")
    assert code == 0
    assert verdicts(report)[("cp1", "vdb")] == "disk-gone"
    (cp1,) = [c for c in report["checkpoints"] if c["name"] == "cp1"]
    assert "libvirt skips it" in cp1["disks"][1]["reason"]
    assert cp1["verdict"] == "disk-gone"
    # vdb's bitmaps are no longer looked at: not orphans of this domain either.
    assert report["orphans"] == []


def test_disks_qbitmap_cannot_check(host, vm):
    vda, _vdb = vm
    raw = host.images / "data.raw"
    raw.write_bytes(b"\0" * 65536)
    host.define(
        "vm",
        [
            Disk("vda", str(vda)),
            Disk("vdb", None, type="network"),
            Disk("vdc", str(raw), format="raw"),
        ],
    )
    host.checkpoint(
        "vm", "cp3", parent="cp2", disks=(("vda", "bitmap"), ("vdb", "bitmap"), ("vdc", "no"))
    )
    qemu.add_bitmap(vda, "cp3")
    code, report = run_json(host, "vm")
    assert code == 0
    v = verdicts(report)
    assert v[("cp3", "vdb")] == "not-checkable" and ("cp3", "vdc") not in v
    disks = {d["target"]: d for d in report["disks"]}
    assert disks["vdc"]["checkable"] is False and "raw" in disks["vdc"]["not_checkable_reason"]
    assert "network" in disks["vdb"]["not_checkable_reason"]


def test_a_running_domain_exit_75(host, vm):
    vda, _vdb = vm
    qemu.require_tools("qemu-storage-daemon")
    with qemu.StorageDaemon(vda, writable=True):
        result = run(*host.args(), "--json", "vm")
        code, report = result.exit_code, json.loads(result.stdout)
        human = run(*host.args(), "vm")
    assert "libvirt's own view is authoritative" in result.stderr
    assert code == 75 and report["running"] is True
    assert set(verdicts(report).values()) == {"running"}
    assert report["orphans"] == [] and report["remedies"] == []
    assert 101 in report["disks"][0]["held_lock_bytes"]
    assert human.exit_code == 75 and "libvirt's own" in human.stdout


def test_recorded_bitmap_name_is_shown_but_the_checkpoint_name_is_looked_up(host, vm):
    host.checkpoint("vm", "cp3", parent="cp2", disks=(("vda", "bitmap", "cp1"),))
    _code, report = run_json(host, "vm")
    (cp3,) = [c for c in report["checkpoints"] if c["name"] == "cp3"]
    disk = cp3["disks"][0]
    assert disk["verdict"] == "missing" and disk["recorded_bitmap"] == "cp1"
    assert "libvirt looks up the checkpoint's name" in disk["reason"]


# -- hostile and broken files ---------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<domaincheckpoint><name>&lol9;</name></domaincheckpoint>
"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<domaincheckpoint><name>&secret;</name></domaincheckpoint>
"""

HOSTILE = {
    "billion-laughs": (BILLION_LAUGHS, "document type declaration"),
    "external-entity": (EXTERNAL_ENTITY, "document type declaration"),
    "undefined-entity": (
        "<domaincheckpoint><name>&x;</name></domaincheckpoint>",
        "undefined entity",
    ),
    "malformed": ("<domaincheckpoint><name>cp</domaincheckpoint>", "not well-formed"),
    "empty": ("", "not well-formed"),
    "not-utf8": (b"<domaincheckpoint><name>\xff\xfe</name></domaincheckpoint>", "not well-formed"),
    "wrong-root": ("<domain><name>x</name></domain>", "not a libvirt <domaincheckpoint>"),
    "no-name": ("<domaincheckpoint><disks/></domaincheckpoint>", "has no <name>"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_checkpoint_file_is_a_finding_naming_it(host, vm, case):
    text, reason = HOSTILE[case]
    path = host.checkpoint_dir / "vm" / "evil.xml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    result = run(*host.args(), "--json", "vm")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    (finding,) = report["findings"]
    assert finding["file"] == str(path) and str(path) in finding["message"]
    assert reason in finding["message"]
    assert "Traceback" not in result.stderr
    assert f"qbitmap: warning: {path}" in result.stderr
    # The other checkpoints are still judged; the file's stem is not taken for an orphan.
    assert set(verdicts(report).values()) == {"ok"}


def test_a_hostile_domain_xml_is_a_finding(host, tmp_path):
    path = tmp_path / "evil.xml"
    path.write_text(EXTERNAL_ENTITY.replace("domaincheckpoint", "domain"))
    result = run(*host.args(), "--json", "--domain-xml", path)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert "document type declaration" in report["findings"][0]["message"]


def test_oversized_and_special_files_are_refused_without_reading_them(host, vm, tmp_path):
    big = host.checkpoint_dir / "vm" / "big.xml"
    with open(big, "wb") as f:
        f.truncate(17 * 1024 * 1024)
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    code, report = run_json(host, "vm")
    assert code == 1 and "more than" in report["findings"][0]["message"]
    started = time.monotonic()
    result = run(*host.args(), "--json", "--domain-xml", fifo)
    assert time.monotonic() - started < 10
    assert result.exit_code == 1 and "not a regular file" in result.stdout


def test_names_from_files_are_escaped_on_the_terminal(host, vm):
    _vda, _vdb = vm
    # XML 1.0 has no ESC, but a newline and a right-to-left override are valid text.
    host.checkpoint("vm", "cp\nfake\u202eevil", parent="cp2", disks=(("vda", "bitmap"),))
    result = run(*host.args(), "vm")
    assert result.exit_code == 4
    assert "\u202e" not in result.stdout and "cp\\nfake\\u202eevil" in result.stdout
    escaped_control = run(*host.args(), "--json", "vm")
    names = [c["name"] for c in json.loads(escaped_control.stdout)["checkpoints"]]
    assert "cp\nfake\u202eevil" in names  # JSON keeps the name exactly


def test_a_control_character_in_a_checkpoint_file_is_malformed_xml(host, vm):
    path = host.checkpoint("vm", "cp3", parent="cp2")
    path.write_text(path.read_text().replace("<name>cp3</name>", "<name>cp\x1b[31m</name>"))
    code, report = run_json(host, "vm")
    assert code == 1 and "not well-formed" in report["findings"][0]["message"]


# -- the command line -----------------------------------------------------------------------


def test_domain_xml_from_virsh_dumpxml(host, vm, tmp_path):
    vda, _vdb = vm
    live = (FIXTURES / "vm1-dumpxml-running.xml").read_text()
    live = live.replace("vm1", "vm").replace("/var/lib/libvirt/images/vm.qcow2", str(vda))
    path = tmp_path / "dump.xml"
    path.write_text(live)
    code, report = run_json(host, "--domain-xml", path)
    assert code == 0 and report["definition"] == str(path)
    assert set(verdicts(report)) == {("cp1", "vda"), ("cp1", "vdb"), ("cp2", "vda"), ("cp2", "vdb")}
    # vdb is not in this definition: its checkpoints' disk is gone.
    assert verdicts(report)[("cp1", "vdb")] == "disk-gone"
    assert run(*host.args(), "--domain-xml", path, "vm").exit_code == 0
    mismatch = run(*host.args(), "--domain-xml", path, "other")
    assert mismatch.exit_code == 64 and "defines domain 'vm', not 'other'" in mismatch.stderr


def test_all_domains_one_object_worst_exit(host, vm):
    _vda, _vdb = vm
    other = qemu.create_image(host.images / "other.qcow2", 64 << 20)
    host.define("other", [Disk("vda", str(other))])
    host.checkpoint("other", "c1")
    (host.config_dir / "broken.xml").write_text("<domain>")
    (host.config_dir / "autostart").mkdir()
    code, report = run_json(host, "--all")
    assert code == report["exit_code"] == 1  # broken.xml: could not read (1 wins over 4)
    by_name = {d["domain"]: d for d in report["domains"]}
    assert set(by_name) == {"broken", "other", "vm"}
    assert by_name["other"]["exit_code"] == 4 and by_name["vm"]["exit_code"] == 0
    assert by_name["broken"]["exit_code"] == 1
    human = run(*host.args(), "--all")
    assert human.exit_code == 1 and "Over 3 domains: exit 1" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "name a DOMAIN"),
        (("--all", "vm"), "--all examines every domain"),
        (("../etc/passwd",), "is not a domain name"),
        (("nosuch",), "no domain named 'nosuch' is defined"),
    ],
)
def test_usage_errors_exit_64(host, args, message):
    result = run(*host.args(), *args)
    assert result.exit_code == 64
    assert message in result.stderr


def test_no_config_directory_exit_1(tmp_path):
    result = run("--config-dir", tmp_path / "none", "vm")
    assert result.exit_code == 1
    assert "no such directory" in result.stderr


def test_the_command_never_writes(host, vm):
    vda, _vdb = vm
    qemu.crash_image(vda, [(0, 65536)], bitmaps=("cp1", "cp2"))
    files = [p for p in host.root.rglob("*") if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    assert run(*host.args(), "vm").exit_code == 4
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before


def test_the_command_defaults_are_libvirts_directories():
    from qbitmap.commands import checkpoints as command
    from qbitmap.libvirt import DEFAULT_CHECKPOINT_DIR, DEFAULT_CONFIG_DIR

    assert Path(command.DEFAULT_CONFIG_DIR) == DEFAULT_CONFIG_DIR == Path("/etc/libvirt/qemu")
    assert Path(command.DEFAULT_CHECKPOINT_DIR) == DEFAULT_CHECKPOINT_DIR
