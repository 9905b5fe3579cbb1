"""man/qbitmap-recover.1 stays in step with the code: options, exit codes, JSON fields, modes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import qemu
from manpage import plain, section
from qbitmap.commands.recover import MODE_CHOICES
from qbitmap.commands.recover import recover as recover_command
from qbitmap.recover import RecoverReport
from qbitmap.recover.engine import BitmapResult
from qbitmap.recover.reference import DiffStats
from qbitmap.render.recover import FAILURE_STATUS, to_json
from qbitmap.store.session import Step

PAGE = Path(__file__).resolve().parents[2] / "man" / "qbitmap-recover.1"


def _has(word: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def test_every_option_is_documented():
    text = plain(PAGE.read_text())
    synopsis_and_options = section(text, "SYNOPSIS") + section(text, "OPTIONS")
    names = [
        n for p in recover_command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")
    ]
    names += ["-h", "--help"]
    assert len(names) >= 10
    for name in names:
        assert _has(name, synopsis_and_options), name
    synopsis = section(text, "SYNOPSIS")
    for param in recover_command.params:
        if param.opts[0].startswith("-"):
            assert any(_has(n, synopsis) for n in param.opts), f"{param.name} missing from SYNOPSIS"


def test_every_mode_is_documented():
    modes = section(plain(PAGE.read_text()), "MODES")
    for mode in MODE_CHOICES:
        assert re.search(rf"^\.B {mode}$", modes, re.MULTILINE), mode


def test_exit_codes_are_documented():
    exits = section(plain(PAGE.read_text()), "EXIT STATUS")
    listed = re.findall(r"^\.B (\d+)$", exits, re.MULTILINE)
    assert listed == ["0", "1", "2", "64", "75", "130"]


def test_json_fields_are_documented():
    json_part = section(plain(PAGE.read_text()), "JSON OUTPUT")
    report = to_json(RecoverReport("x", dry_run=False))
    fields = (
        set(report) | set(BitmapResult("n", "recovered").to_dict()) | set(DiffStats().to_dict())
    )
    fields |= set(Step("p", "a", 0, 0, "w").to_dict()) | {"path"}
    for field in sorted(fields):
        assert _has(field, json_part), field
    for status in (
        "recovered",
        "leaks-reclaimed",
        "nothing-to-do",
        "dry-run",
        *FAILURE_STATUS.values(),
    ):
        assert _has(status, json_part), status


def test_man_renders():
    qemu.require_tools("man")
    proc = subprocess.run(
        ["man", "-l", "-Tutf8", str(PAGE)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = re.sub(".\x08", "", proc.stdout)  # overstrike bold/underline
    assert "CRASH SAFETY" in out and "qbitmap-recover" in out.replace("‐", "-")
    assert "warning" not in proc.stderr.lower(), proc.stderr
