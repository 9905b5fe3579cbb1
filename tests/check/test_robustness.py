"""Any input: never a traceback, never unbounded memory or time from a lying field.

Two parts: hand-picked lying fields (each with a memory bound measured by
tracemalloc, which sees numpy's buffers), and a hypothesis fuzz test that
mutates real QEMU images -- bytes flipped or overwritten with telling values
in the header cluster, the directory, the bitmap tables and the other
metadata -- and runs check both through the CLI (in-process) and the library.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import corrupt
import pytest
import qemu
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbitmap.check import check_path
from qbitmap.cli import cli

MiB = 1024 * 1024
MEMORY_BOUND = 48 * MiB


def _bounded_check(path: Path) -> tuple[int, float, int]:
    """Run check in-process; return (exit code, seconds, peak traced bytes)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        report = check_path(path)
        json.dumps(report.to_dict())
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return report.exit_code, time.monotonic() - start, peak


def _lie(lay: corrupt.Layout, what: str) -> None:
    p = lay.path
    if what == "dir-size-64mib-on-small-file":
        corrupt.poke(p, lay.ext_offset + 16, ">Q", 67107840)  # QEMU's maximum, the file is ~2 MiB
    elif what == "dir-spanning-the-file":
        corrupt.poke(p, lay.ext_offset + 8, ">I", 65535)
        corrupt.poke(p, lay.ext_offset + 16, ">Q", lay.file_size - 0x10000)
        corrupt.poke(p, lay.ext_offset + 24, ">Q", 0x10000)
    elif what == "table-2^27-entries":
        corrupt.poke(p, lay.entry("b0").offset + 8, ">I", 1 << 27)
    elif what == "table-covering-the-file":
        corrupt.poke(p, lay.entry("b0").offset, ">Q", 0x10000)
        corrupt.poke(p, lay.entry("b0").offset + 8, ">I", (lay.file_size - 0x10000) // 8)
    elif what == "l1-32mib":
        corrupt.poke(p, 36, ">I", 4 * MiB)
    elif what == "l1-whole-file":
        corrupt.poke(p, 36, ">I", (lay.file_size - lay.l1_offset) // 8)
    elif what == "refcount-table-4g-clusters":
        corrupt.poke(p, 56, ">I", 0xFFFFFFFF)
    elif what == "snapshots-65536":
        corrupt.poke(p, 60, ">I", 65536)
    elif what == "snapshots-65535-tiny":
        corrupt.poke(p, 60, ">I", 65535)
    elif what == "virtual-size-2^62":
        corrupt.poke(p, 24, ">Q", 1 << 62)
    elif what == "cycle-l1-is-its-own-l2":
        corrupt.poke(p, lay.l1_offset, ">Q", lay.l1_offset | 1 << 63)
    elif what == "cycle-reftable-is-its-own-block":
        corrupt.poke(p, lay.refcount_table_offset, ">Q", lay.refcount_table_offset)
    elif what == "cycle-table-points-at-itself":
        corrupt.poke(p, lay.entry("b0").table_offset, ">Q", lay.entry("b0").table_offset)
    elif what == "snapshot-l1-is-active-l1":
        corrupt.poke(p, lay.snapshots_offset, ">Q", lay.l1_offset)
    elif what == "all-tables-on-one":
        corrupt.poke(p, lay.entry("b1").offset, ">Q", lay.entry("b0").table_offset)
        corrupt.poke(p, lay.entry("b1").offset + 8, ">I", 8192)
    else:  # pragma: no cover
        raise ValueError(what)


LIES = [
    "dir-size-64mib-on-small-file",
    "dir-spanning-the-file",
    "table-2^27-entries",
    "table-covering-the-file",
    "l1-32mib",
    "l1-whole-file",
    "refcount-table-4g-clusters",
    "snapshots-65536",
    "snapshots-65535-tiny",
    "virtual-size-2^62",
    "cycle-l1-is-its-own-l2",
    "cycle-reftable-is-its-own-block",
    "cycle-table-points-at-itself",
    "snapshot-l1-is-active-l1",
    "all-tables-on-one",
]


@pytest.mark.parametrize("what", LIES)
def test_lying_field_is_bounded(what, base_image, tmp_path):
    img = tmp_path / "lie.qcow2"
    shutil.copyfile(base_image, img)
    _lie(corrupt.layout(img), what)
    code, seconds, peak = _bounded_check(img)
    assert code in (1, 2), code
    assert peak < MEMORY_BOUND, f"{what}: {peak / MiB:.1f} MiB"
    assert seconds < 30, f"{what}: {seconds:.1f} s"


# -- fuzzing ------------------------------------------------------------------------------

_BASES: dict[str, bytes] = {}


def _base_bytes(name: str) -> bytes:
    """Base images for the fuzzer, built once per process by real QEMU tools."""
    if name not in _BASES:
        qemu.require_tools("qemu-img", "qemu-io")
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{name}.qcow2"
            if name == "base":
                corrupt.make_base(path)
            elif name == "levels":  # an in-use bitmap with a trusted consistency-level record
                corrupt.make_base(path)
                lay = corrupt.layout(path)
                corrupt.EDITS["in-use"](lay)
                record = (lay.entry("b0").table_offset, 0, 6, 1, 16, b"b0")
                qemu.append_header_extension(
                    path, corrupt.LEVELS_EXT, corrupt._levels_ext([record])
                )
                qemu.set_autoclear_bits(path, 1 << 63)
            else:  # small clusters: more structures per byte
                qemu.create_image(path, 4 * MiB, cluster_size=512)
                qemu.add_bitmap(path, "a", granularity=512)
                qemu.add_bitmap(path, "b", granularity=4096)
                qemu.qemu_io(path, "write 0 64k", "write -c 1M 512", "write 4000k 96k")
            _BASES[name] = path.read_bytes()
    return _BASES[name]


def _regions(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of the metadata worth mutating, found with the independent reader."""
    with tempfile.NamedTemporaryFile(suffix=".qcow2") as f:
        f.write(data)
        f.flush()
        lay = corrupt.layout(Path(f.name))
        cs = lay.cluster_size
        regions = [(0, min(cs, 1024)), (lay.ext_offset, 32), (lay.dir_offset, lay.dir_size)]
        levels = [o for o, m, _d in qemu.header_extensions(f.name) if m == corrupt.LEVELS_EXT]
        regions += [(o, 32) for o in levels]
        for e in lay.entries:
            regions.append((e.table_offset, 8 * e.table_size))
        regions += [
            (lay.l1_offset, 8),
            (lay.l2_offset, cs),
            (lay.refcount_table_offset, 64),
            (lay.refcount_block, min(cs, 512)),
        ]
        if lay.snapshots_offset:
            regions.append((lay.snapshots_offset, 64))
    return [(s, n) for s, n in regions if n > 0 and s + n <= len(data)]


VALUES = st.sampled_from(
    [
        0,
        1,
        2,
        7,
        8,
        9,
        24,
        31,
        32,
        63,
        64,
        512,
        0xFFFF,
        0x10000,
        0x8000000,
        0x20000000,
        0xFFFFFFFF,
        1 << 32,
        1 << 40,
        1 << 55,
        (1 << 63) | 0x30000,
        0x7FFFFFFFFFFFFFFF,
        0xFFFFFFFFFFFFFFFF,
    ]
)

MUTATION = st.tuples(
    st.integers(min_value=0, max_value=10_000),  # region (mod count)
    st.integers(min_value=0, max_value=1 << 20),  # offset in region (mod length)
    st.sampled_from(["flip", "u8", "u16", "u32", "u64"]),
    st.integers(min_value=1, max_value=255),  # xor mask for "flip"
    VALUES,
)


def _mutate(data: bytes, mutations: list[tuple[int, int, str, int, int]]) -> bytes:
    buf = bytearray(data)
    regions = _regions(data)
    for region, off, kind, mask, value in mutations:
        start, length = regions[region % len(regions)]
        pos = start + off % length
        if kind == "flip":
            buf[pos] ^= mask
            continue
        fmt = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}[kind]
        size = struct.calcsize(fmt)
        pos -= pos % size  # fields are naturally aligned
        raw = struct.pack(fmt, value & ((1 << (8 * size)) - 1))
        buf[pos : pos + size] = raw[: max(0, len(buf) - pos)]
    return bytes(buf)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    base=st.sampled_from(["base", "small", "levels"]),
    mutations=st.lists(MUTATION, min_size=1, max_size=6),
    as_json=st.booleans(),
)
def test_fuzz_mutated_images(base, mutations, as_json):
    data = _mutate(_base_bytes(base), mutations)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.qcow2"
        path.write_bytes(data)
        args = ["check", "--json", str(path)] if as_json else ["check", str(path)]
        result = CliRunner().invoke(cli, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in (0, 1, 2, 3, 4), (result.exit_code, result.stdout, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
        if as_json:
            report = json.loads(result.stdout)
            assert report["exit_code"] == result.exit_code
        library = check_path(path)
        assert library.exit_code == result.exit_code
        json.dumps(library.to_dict())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    base=st.sampled_from(["base", "small", "levels"]),
    mutations=st.lists(MUTATION, min_size=1, max_size=4),
)
def test_fuzz_agrees_with_qemu(base, mutations):
    """Whatever the damage: QEMU refuses the image => check exits 1 or 2, and
    check calls the bitmaps usable (0, 3, 4) => QEMU opens the image."""
    qemu.require_tools("qemu-img")
    data = _mutate(_base_bytes(base), mutations)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.qcow2"
        path.write_bytes(data)
        code = check_path(path).exit_code
        # bytes, not text: QEMU's messages quote bitmap names, which may be any bytes here
        proc = subprocess.run(
            ["qemu-img", "info", "-f", "qcow2", "-U", str(path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            assert code in (1, 2), proc.stderr
        if code in (0, 3, 4):
            assert proc.returncode == 0, proc.stderr
