"""man/qbitmap-check.1 stays in step with the code: finding codes, options, exit codes, JSON."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import qemu
from manpage import plain, section

from qbitmap.check import CODES, CheckReport, Finding
from qbitmap.commands.check import check as check_command

PAGE = Path(__file__).resolve().parents[2] / "man" / "qbitmap-check.1"


def _listed_codes(text: str) -> dict[str, str]:
    """code -> severity word, from the ``.TP/.B code/(severity) ...`` items of FINDINGS."""
    findings = section(text, "FINDINGS")
    items = re.findall(r"^\.TP\n\.B ([a-z0-9-]+)\n\(([a-z-]+)\)", findings, re.MULTILINE)
    return dict(items)


def test_every_finding_code_is_documented_with_its_severity():
    listed = _listed_codes(plain(PAGE.read_text()))
    assert set(listed) == set(CODES), {
        "missing from the page": sorted(set(CODES) - set(listed)),
        "not in the code": sorted(set(listed) - set(CODES)),
    }
    for code, (severity, _description) in CODES.items():
        assert listed[code] == severity.label, code


def test_the_registry_is_what_findings_use():
    """A finding's severity can only come from CODES, so the page cannot be fooled."""
    report = CheckReport("x", [Finding(code, "m") for code in CODES])
    assert {f.code for f in report.findings} == set(CODES)
    with pytest.raises(ValueError):
        Finding("undocumented-code", "m")


def test_every_option_is_documented():
    text = plain(PAGE.read_text())
    options = section(text, "OPTIONS") + section(text, "SYNOPSIS")
    names = [
        n for p in check_command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")
    ]
    names += ["-h", "--help"]
    assert names
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", options), name


def test_exit_codes_and_json_fields_are_documented():
    text = plain(PAGE.read_text())
    exits = section(text, "EXIT STATUS")
    for code in ("0", "1", "2", "3", "4", "64", "130"):
        assert re.search(rf"^\.B {code}$", exits, re.MULTILINE), code
    json_part = section(text, "JSON OUTPUT")
    for field in (
        "filename",
        "findings",
        "code",
        "severity",
        "bitmap",
        "offset",
        "field",
        "message",
        "bitmaps",
        "name",
        "status",
        "levels",
        "exit_code",
        "error",
        "consistent_level",
        "max_level",
        "level_bits",
        "recovery_granularity",
        "recovery_dirty_bytes",
    ):
        assert re.search(rf"\b{field}\b", json_part), field


def test_page_renders_without_warnings():
    qemu.require_tools("groff", "man")
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-Tutf8", str(PAGE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
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
    assert "bitmap-cluster-overlap" in rendered
    assert "EXIT STATUS" in rendered
