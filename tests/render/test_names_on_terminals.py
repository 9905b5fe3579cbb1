"""Text from an image reaches a terminal inert and whole: escaped, one line, never cut.

Bitmap names come from the image and file names from the command line; either
may hold escape sequences (a window title, colours), bidi overrides, newlines
or bytes that are not UTF-8.  Every human form of every command (tables,
warnings, errors, recover's plan) goes through one escaping function, and
every table keeps names whole whatever the width of the terminal or pipe.
Images are made by QEMU (``qemu-img bitmap --add`` and a SIGKILLed
qemu-storage-daemon); a name QEMU's tools refuse is written with ``struct``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import corrupt
import pytest
import qemu

from qbitmap.render import printable

MiB = 1 << 20

# Names qemu-img accepts, each an attack on a terminal or on a table's rows.
TITLE = "title\x1b]0;pwned\x07\x1b[31mred\x1b[0m"
BIDI = "invoice\u202egpj.exe\u2066x\u2069"
ROWS = "row\nsplit\rback"
# Not UTF-8: qemu-img cannot pass it, so struct renames bitmap "raw" to these bytes.
RAW_BYTES = b"raw\xff\xfe\x9b"
HOSTILE = [TITLE, BIDI, ROWS]
# How each name must appear on a terminal (the bytes not UTF-8 are shown as \xNN).
SHOWN = {
    TITLE: "title\\x1b]0;pwned\\x07\\x1b[31mred\\x1b[0m",
    BIDI: "invoice\\u202egpj.exe\\u2066x\\u2069",
    ROWS: "row\\nsplit\\rback",
    "raw": "raw\\xff\\xfe\\x9b",
}

# Names that must survive any table width whole (recover once printed both as "virtnbdb…").
LONG = ["virtnbdbackup", "virtnbdbackup.0", "n" * 150, "a name with several spaces in it"]


def qbitmap(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real program, stdout and stderr being pipes (bytes, nothing decoded)."""
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(os.fsencode, map(str, args))],
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
    )


def assert_inert(output: bytes) -> str:
    """*output* is UTF-8 whose characters are all printable, bar the newlines ending lines."""
    text = output.decode("utf-8")
    bad = sorted({c for c in text if not c.isprintable() and c != "\n"})
    assert not bad, f"raw characters reached the terminal: {bad!r}"
    return text


def assert_whole_on_one_line(text: str, shown: str) -> None:
    assert any(shown in line for line in text.splitlines()), f"{shown!r} not whole on a line"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crashed image (every bitmap in use, with data) whose bitmap names attack terminals."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = tmp_path_factory.mktemp("hostile") / "hostile.qcow2"
    qemu.create_image(path, 64 * MiB)
    for name in [*HOSTILE, "raw"]:
        qemu.add_bitmap(path, name)
    qemu.qemu_io_write(path, [(0, 65536), (5 * MiB, 65536)])
    qemu.crash_image(path, [(9 * MiB, 4096)], bitmaps=[*HOSTILE, "raw"])
    lay = corrupt.layout(path)
    corrupt.rewrite_directory(
        lay, [(e, b"", RAW_BYTES if e.name == b"raw" else e.name) for e in lay.entries]
    )
    assert [e.name for e in corrupt.layout(path).entries] == [
        *(n.encode() for n in HOSTILE),
        RAW_BYTES,
    ]
    path.chmod(0o444)
    return path


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    controls = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]
    bidi = [chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F]]
    for char in [*controls, *bidi, "\u2028", "\u200b", "\xa0", "\ufeff"]:
        shown = printable(f"a{char}b")
        assert shown.isprintable() and shown.startswith("a\\") and shown.endswith("b"), shown
    assert printable("plain name-1.0 [x] é ü 100%") == "plain name-1.0 [x] é ü 100%"
    assert printable(os.fsdecode(b"disk\xff.qcow2")) == "disk\\xff.qcow2"
    assert printable(ROWS) == SHOWN[ROWS] and printable(BIDI) == SHOWN[BIDI]


def test_dump_tables_and_warnings_escape_names(hostile: Path) -> None:
    proc = qbitmap("dump", "--extents", hostile)
    assert proc.returncode == 0, proc.stderr
    out, err = assert_inert(proc.stdout), assert_inert(proc.stderr)
    for shown in SHOWN.values():
        assert_whole_on_one_line(out, shown)
    # One stale warning per in-use bitmap, each one line.
    assert err.count("\n") == len(SHOWN) and err.count("is in use") == len(SHOWN)


def test_check_escapes_names(hostile: Path) -> None:
    proc = qbitmap("check", hostile)
    assert proc.returncode == 4, proc.stderr
    out = assert_inert(proc.stdout)
    assert_inert(proc.stderr)
    for shown in SHOWN.values():
        assert_whole_on_one_line(out, shown)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "written"])
def test_recover_tables_and_plan_escape_names(hostile: Path, tmp_path: Path, dry_run: bool) -> None:
    image = tmp_path / "hostile.qcow2"
    shutil.copyfile(hostile, image)
    proc = qbitmap("recover", "--mode", "full", *(["--dry-run"] if dry_run else []), image)
    assert proc.returncode == 0, proc.stderr
    out = assert_inert(proc.stdout)
    assert_inert(proc.stderr)
    for shown in SHOWN.values():
        assert_whole_on_one_line(out, shown)
    if dry_run:
        assert "Writes, in order" in out


def test_error_lines_escape_names(hostile: Path) -> None:
    proc = qbitmap("dump", "-b", TITLE + "x", hostile)
    assert proc.returncode == 64
    err = assert_inert(proc.stderr)
    assert err.count("\n") == 1 and SHOWN[TITLE] + "x" in err


def test_error_lines_name_hostile_files_escaped(hostile: Path, tmp_path: Path) -> None:
    # A file whose name attacks the terminal, and one whose name is not UTF-8.
    for raw_name in (b"bad\x1b]0;pwned\x07\nname.qcow2", b"bad\xff\xfe.qcow2"):
        path = Path(os.fsdecode(bytes(tmp_path) + b"/" + raw_name))
        path.write_bytes(b"not an image\n" * 100)
        for command in ("dump", "check", "recover"):
            proc = qbitmap(command, *(["--mode", "full"] if command == "recover" else []), path)
            assert proc.returncode == 1, (command, proc.stderr)
            err = assert_inert(proc.stderr)
            assert err.count("\n") == 1 and err.startswith("qbitmap: error: "), err
            assert printable(str(path)) in err
            assert_inert(proc.stdout)
        copy = path.with_suffix(".copy")
        shutil.copyfile(hostile, copy)
        proc = qbitmap("dump", copy)
        assert proc.returncode == 0
        assert_whole_on_one_line(assert_inert(proc.stdout), printable(str(copy)))


@pytest.fixture(scope="module")
def long_names(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crashed image whose bitmaps, all in use, have the names in LONG."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = tmp_path_factory.mktemp("long") / "long.qcow2"
    qemu.create_image(path, 64 * MiB)
    qemu.crash_image(path, [(0, 4096)], bitmaps=LONG)
    path.chmod(0o444)
    return path


@pytest.mark.parametrize("columns", [20, 40, 80, 200])
@pytest.mark.parametrize("command", ["dump", "check", "recover"])
def test_tables_never_cut_a_name(
    long_names: Path, tmp_path: Path, command: str, columns: int
) -> None:
    args: list[object] = [command, long_names]
    if command == "recover":
        image = tmp_path / "long.qcow2"
        shutil.copyfile(long_names, image)
        args = ["recover", "--mode", "full", image]
    proc = qbitmap(*args, env={"COLUMNS": str(columns)})
    assert proc.returncode in (0, 4), proc.stderr
    out = proc.stdout.decode()
    assert "…" not in out
    table_rows = [line.strip() for line in out.splitlines()]
    for name in LONG:
        # Whole, on one line, at the start of its row: not cut, not folded, not wrapped.
        assert any(row.startswith(name + " ") for row in table_rows), (name, out)
