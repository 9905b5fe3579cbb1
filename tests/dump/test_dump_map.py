"""``dump``'s map: where on the disk a bitmap's dirty bytes lie, one shaded cell per column.

The cell arithmetic is checked against the dirty ranges QEMU itself exports
(``qemu-nbd -B`` + ``nbdinfo``) for writes made by ``qemu-io``; the drawing
is checked through the real program, on a pseudo-terminal and in a pipe.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from itertools import pairwise
from pathlib import Path

import pytest
import qemu
from dumprun import dump_process

from qbitmap.format import Image
from qbitmap.inspect import dump_report
from qbitmap.render.density import (
    ASCII_SHADES,
    UTF8_SHADES,
    cell_bounds,
    cell_dirty_bytes,
    shade_levels,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
UTF8 = {"LANG": "C.UTF-8", "LC_ALL": "", "LC_CTYPE": ""}


def map_cells(path: Path, bitmap: str, width: int) -> tuple[list[int], list[int]]:
    """``(bounds, dirty bytes per cell)`` of *bitmap*'s map *width* cells wide, from qbitmap."""
    with Image.open(path) as image:
        report = dump_report(image, filename=str(path), names=[bitmap])
        bounds = cell_bounds(report.info["virtual_size"], width)
        return bounds, cell_dirty_bytes(bounds, report.maps[0])


def expected_cells(extents: list[tuple[int, int]], bounds: list[int]) -> list[int]:
    """Dirty bytes per cell, from QEMU's ranges, by brute force."""
    out = []
    for lo, hi in pairwise(bounds):
        out.append(sum(max(0, min(hi, s + n) - max(lo, s)) for s, n in extents))
    return out


def strip_of(stdout: str, name: str) -> str:
    """The strip line drawn for bitmap *name* (the line after its title)."""
    lines = stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith(f"Map of '{name}'"))
    return lines[title + 1]


@pytest.fixture(scope="module")
def first_and_last(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB; bitmap b0 (64 KiB) dirty in the first and the last cluster only."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path_factory.mktemp("map") / "ends.qcow2", GiB)
    qemu.add_bitmap(path, "b0", granularity=64 * KiB)
    qemu.qemu_io_write(path, [(0, 64 * KiB), (GiB - 64 * KiB, 64 * KiB)], zero=True)
    path.chmod(0o444)
    return path


def test_first_and_last_cluster_shade_the_first_and_last_cell(first_and_last: Path) -> None:
    assert qemu.nbd_dirty_extents(first_and_last, "b0") == [
        (0, 64 * KiB),
        (GiB - 64 * KiB, 64 * KiB),
    ]
    for width in (1, 2, 3, 80, 81, 200):
        bounds, dirty = map_cells(first_and_last, "b0", width)
        assert len(dirty) == width and bounds[0] == 0 and bounds[-1] == GiB
        if width == 1:
            assert dirty == [128 * KiB]
        else:
            assert dirty == [64 * KiB] + [0] * (width - 2) + [64 * KiB], width
    result = dump_process("--map", first_and_last, env={"COLUMNS": "80", **UTF8})
    assert result.exit_code == 0, result.stderr
    assert strip_of(result.stdout, "b0") == "░" + "·" * 78 + "░"


@pytest.mark.parametrize(
    ("size", "granularity", "writes"),
    [
        # Ranges on no granule or cell boundary.
        (100 * MiB, 64 * KiB, [(3 * MiB + 5, 70_000), (40 * MiB - 1, 2), (99 * MiB, MiB)]),
        # Granules far larger than a cell: one granule spans many cells.
        (64 * MiB, 4 * MiB, [(MiB, 1), (33 * MiB, 5 * MiB)]),
        # A disk that is not a whole number of granules: the last one is cut at its end.
        (10 * MiB + 512, 64 * KiB, [(10 * MiB, 512), (0, 512)]),
        # 512-byte granules, many small ranges.
        (8 * MiB, 512, [(i * 37 * KiB, 1536) for i in range(200)]),
    ],
    ids=["unaligned", "coarse", "short-last-granule", "fine"],
)
def test_cells_hold_exactly_the_dirty_bytes_qemu_reports(
    tmp_path: Path, size: int, granularity: int, writes: list[tuple[int, int]]
) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    path = qemu.create_image(tmp_path / "x.qcow2", size)
    qemu.add_bitmap(path, "b0", granularity=granularity)
    qemu.qemu_io_write(path, writes, zero=True)
    extents = qemu.nbd_dirty_extents(path, "b0")
    assert extents
    for width in (1, 7, 80, 333, 1000):
        bounds, dirty = map_cells(path, "b0", width)
        assert dirty == expected_cells(extents, bounds), width
        assert sum(dirty) == sum(n for _, n in extents)


def test_each_shade_follows_the_dirty_fraction(tmp_path: Path) -> None:
    """80 MiB in 80 cells of 1 MiB: clean, a quarter, a half, 15/16, whole."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path / "shades.qcow2", 80 * MiB)
    qemu.add_bitmap(path, "b0", granularity=64 * KiB)
    qemu.qemu_io_write(
        path, [(MiB, 256 * KiB), (2 * MiB, 512 * KiB), (3 * MiB, 960 * KiB), (4 * MiB, MiB)]
    )
    bounds, dirty = map_cells(path, "b0", 80)
    assert shade_levels(dirty, bounds)[:6] == [0, 1, 2, 3, 4, 0]
    utf8 = dump_process("--map", path, env={"COLUMNS": "80", **UTF8})
    assert strip_of(utf8.stdout, "b0") == "·░▒▓█" + "·" * 75
    ascii_ = dump_process("--map", path, env={"COLUMNS": "80", "LANG": "C", "LC_ALL": ""})
    assert strip_of(ascii_.stdout, "b0") == ".:+*#" + "." * 75
    lines = utf8.stdout.splitlines()
    labels = lines[lines.index(strip_of(utf8.stdout, "b0")) + 1]
    assert labels.startswith("0 ") and labels.endswith(" 80 MiB") and len(labels) == 80


def test_one_dirty_byte_is_never_shown_clean_and_only_a_whole_cell_is_full() -> None:
    bounds = cell_bounds(1000, 4)  # cells of 250 bytes
    assert bounds == [0, 250, 500, 750, 1000]
    assert shade_levels([1, 249, 250, 0], bounds) == [1, 3, 4, 0]
    assert shade_levels([83, 84, 166, 167], bounds) == [1, 2, 2, 3]
    assert cell_bounds(5, 80) == [0, 1, 2, 3, 4, 5]  # never more cells than bytes
    assert cell_bounds(0, 80) == [0]
    assert len(UTF8_SHADES) == len(ASCII_SHADES) == 5 and ASCII_SHADES.isascii()


def test_the_map_of_an_in_use_bitmap_is_marked_stale(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = qemu.create_image(tmp_path / "crashed.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 64 * KiB)])
    qemu.crash_image(path, [(32 * MiB, 64 * KiB)], bitmaps=("b0",))
    result = dump_process("--map", path, env={"COLUMNS": "64", **UTF8})
    assert result.exit_code == 0, result.stderr
    title = next(line for line in result.stdout.splitlines() if line.startswith("Map of 'b0'"))
    assert title.endswith("STALE")
    # What is on disk: the write made before the crash, not the one made during it.
    assert strip_of(result.stdout, "b0") == "░" + "·" * 63


def test_map_is_drawn_on_a_terminal_and_not_in_a_pipe(first_and_last: Path) -> None:
    piped = dump_process(first_and_last, env={"COLUMNS": "80"})
    assert piped.exit_code == 0 and "Map of" not in piped.stdout
    shown = on_terminal(["dump", str(first_and_last)], columns=100)
    assert "Map of 'b0' (100 cells of 10.2 MiB)" in shown
    strips = [line for line in shown.splitlines() if line.startswith("░")]
    assert strips == ["░" + "·" * 98 + "░"]


def test_map_refuses_the_machine_forms(first_and_last: Path) -> None:
    for extra in (["--json"], ["--lines"], ["--output=json"], ["--backing-chain"]):
        result = dump_process("--map", *extra, first_and_last)
        assert result.exit_code == 64, (extra, result.stderr)
        assert result.stderr.count("\n") == 1 and "--map" in result.stderr


def on_terminal(args: list[str], *, columns: int) -> str:
    """Run ``python -m qbitmap ARGS`` with a pseudo-terminal *columns* wide as stdout."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(UTF8, TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qbitmap", "--no-color", *args],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("no output from the terminal in 60 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode().replace("\r\n", "\n")
