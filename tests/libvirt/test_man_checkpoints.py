"""man/qbitmap-checkpoints.1 stays in step with the code: options, verdicts, exit codes, JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import qemu
from libvirt_files import Disk, Host
from manpage import plain, section

from qbitmap.commands.checkpoints import checkpoints as command
from qbitmap.libvirt import VERDICT_ORDER

PAGE = Path(__file__).resolve().parents[2] / "man" / "qbitmap-checkpoints.1"


def test_every_option_is_documented():
    text = plain(PAGE.read_text())
    options = section(text, "OPTIONS")
    synopsis = section(text, "SYNOPSIS")
    names = [n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")]
    names += ["-h", "--help"]
    assert len(names) > 5
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", options), name
        if name not in ("-h", "--help"):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", synopsis), name
    documented = set()
    for item in re.findall(r"^\.TP\n(.*)$", options, re.MULTILINE):
        documented |= set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", item))
    assert documented == set(names)


def test_every_verdict_is_documented():
    text = plain(PAGE.read_text())
    listed = re.findall(r"^\.TP\n\.B ([a-z-]+)$", section(text, "VERDICTS"), re.MULTILINE)
    assert listed == list(VERDICT_ORDER)


def test_exit_codes_are_documented():
    text = plain(PAGE.read_text())
    listed = re.findall(r"^\.TP\n\.B (\d+)$", section(text, "EXIT STATUS"), re.MULTILINE)
    assert listed == ["0", "1", "2", "4", "64", "75"]
    assert "the first of 1, 75, 2, 4 wins" in section(text, "EXIT STATUS")


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_every_json_key_is_documented(tmp_path):
    host = Host(tmp_path)
    vda = qemu.create_image(host.images / "vda.qcow2", 64 << 20)
    host.define("vm", [Disk("vda", str(vda))])
    host.checkpoint("vm", "cp1")
    host.checkpoint("vm", "cp2", parent="cp1")
    qemu.add_bitmap(vda, "cp1")
    qemu.add_bitmap(vda, "orphan")
    (host.checkpoint_dir / "vm" / "bad.xml").write_text("<")
    from click.testing import CliRunner

    from qbitmap.cli import cli

    one = CliRunner().invoke(cli, ["checkpoints", *host.args(), "--json", "vm"])
    every = CliRunner().invoke(cli, ["checkpoints", *host.args(), "--json", "--all"])
    report = json.loads(one.stdout)
    assert report["checkpoints"] and report["orphans"] and report["findings"]
    assert report["remedies"] and report["checkpoints"][0]["disks"][0]["chain"]["layers"]
    # cp2's bitmap is missing: a repair creates it.
    args = ["checkpoints", *host.args(), "--json", "--repair"]
    planned = json.loads(CliRunner().invoke(cli, [*args, "--dry-run", "vm"]).stdout)
    (image,) = planned["repair"]["images"]
    assert image["steps"] and image["bitmaps"] and planned["repair"]["repairs"]
    repaired = json.loads(CliRunner().invoke(cli, [*args, "--all"]).stdout)
    assert repaired["domains"][0]["repair"]["status"] == "repaired"
    keys = _keys(report) | _keys(json.loads(every.stdout)) | _keys(planned) | _keys(repaired)
    text = section(plain(PAGE.read_text()), "JSON OUTPUT").replace("\\(dq", '"')
    words = set(re.findall(r"[a-z_]+", text))
    assert keys - words == set()


def test_page_renders_without_warnings():
    if shutil.which("groff") is None:
        qemu.require_tools("groff")
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-Tutf8", "-z", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    if shutil.which("mandoc"):
        lint = subprocess.run(
            ["mandoc", "-Tlint", "-W", "warning", str(PAGE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr
    qemu.require_tools("man")
    shown = subprocess.run(
        ["man", "-l", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "100"},
    )
    assert shown.returncode == 0, shown.stderr
    rendered = re.sub(".\x08", "", shown.stdout).replace("\u2010", "-")
    assert "missing or broken bitmap" in rendered and "EXIT STATUS" in rendered


@pytest.mark.parametrize("page", ["qbitmap.1", "qbitmap-check.1"])
def test_the_other_pages_point_here(page):
    text = (PAGE.parent / page).read_text()
    assert r".BR qbitmap\-checkpoints (1)" in text
