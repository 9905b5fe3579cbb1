"""man/qbitmap-levels.5 renders and stays in step with the code it documents."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import qemu

from qbitmap.format import layout
from qbitmap.track import FlushPolicy

MAN = Path(__file__).resolve().parents[2] / "man" / "qbitmap-levels.5"


def source_text() -> str:
    """The page's words with roff escapes and font changes taken out."""
    text = MAN.read_text()
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\(mu", "x")


def field_names(schema) -> list[str]:
    return [sc.name for sc in schema.subcons if sc.name]


def test_man_renders_without_warnings():
    qemu.require_tools("man")
    proc = subprocess.run(
        ["man", "-l", str(MAN)],
        capture_output=True,
        text=True,
        env={
            **{k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"},
            "MANWIDTH": "80",
            "PAGER": "cat",
        },
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = re.sub(".\b", "", proc.stdout)  # overstrike bold, if any
    assert "QBITMAP-LEVELS(5)" in out
    for heading in ("FORMAT", "TRUST", "RECOVERY", "WRITER PROTOCOL"):
        assert f"\n{heading}\n" in out


def test_man_names_the_magic_the_autoclear_bit_and_every_record_field():
    text = source_text()
    assert f"{layout.EXT_LEVELS:#010x}" in text
    assert f"bit {layout.LEVELS_AUTOCLEAR_BIT}" in text
    assert "autoclear" in text.lower()
    fields = field_names(layout.LevelRecord) + field_names(layout.LevelsExtensionHeader)
    assert {"bitmap_table_offset", "consistent_level", "level_bits", "max_level"} <= set(fields)
    missing = [name for name in fields if not re.search(rf"\b{name}\b", text)]
    assert missing == []


def test_man_documents_the_flush_policy_fields():
    text = source_text()
    for f in dataclasses.fields(FlushPolicy):
        assert f"{f.name}=" in text
