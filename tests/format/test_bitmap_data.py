"""Bitmap data: table entries (data, zero, all-ones), bit order, the disk's end, bounded reads.

The decoding functions are checked against a naive bit-by-bit model
(hypothesis), and on real images -- some with hand-edited table entries --
against what QEMU itself exports over NBD.  Images with lying sizes must be
read in bounded memory and time (measured in a subprocess).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import qemu
from hypothesis import given, settings
from hypothesis import strategies as st

from qbitmap.format import (
    Chunk,
    Geometry,
    Image,
    bit_runs,
    dirty_bytes,
    extent_arrays,
    extent_blocks,
    extents,
    iter_chunks,
    read_bits,
    run_arrays,
    run_blocks,
)
from qbitmap.format import bitmap as bitmap_module

MiB = 1 << 20


# -- the pure functions against a naive model ---------------------------------------


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[Geometry, list[Chunk], np.ndarray]:
    """A geometry, chunks covering its bits, and the bits they mean (one uint8 per bit)."""
    granularity = 1 << draw(st.integers(9, 22))
    nbits = draw(st.integers(1, 3000))
    # The last granule may be partial.
    virtual_size = (nbits - 1) * granularity + draw(st.integers(1, granularity))
    geo = Geometry(virtual_size, granularity, 512)
    bits = np.zeros(nbits, np.uint8)
    chunks: list[Chunk] = []
    pos = 0
    while pos < nbits:
        n = min(draw(st.integers(1, 700)), nbits - pos)
        kind = draw(st.sampled_from(["zero", "ones", "data", "data", "data"]))
        if kind == "ones":
            bits[pos : pos + n] = 1
            chunks.append(Chunk(pos, n, "ones"))
        elif kind == "data":
            density = draw(st.sampled_from([0.01, 0.3, 0.5, 0.97, 1.0]))
            seed = draw(st.integers(0, 2**32 - 1))
            chunk_bits = (np.random.default_rng(seed).random(n) < density).astype(np.uint8)
            bits[pos : pos + n] = chunk_bits
            # A data chunk's bits past its length are clear (Chunk's contract;
            # test_bits_past_the_disk_end_are_ignored holds iter_chunks to it).
            packed = np.packbits(chunk_bits, bitorder="little")
            chunks.append(Chunk(pos, n, "data", packed))
        else:
            chunks.append(Chunk(pos, n, "zero"))
        pos += n
    return geo, chunks, bits


def naive_runs(bits: np.ndarray) -> list[tuple[int, int]]:
    runs, i = [], 0
    while i < len(bits):
        if bits[i]:
            j = i
            while j < len(bits) and bits[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


@settings(max_examples=300, deadline=None)
@given(bitmaps(), st.sampled_from([8, 24, 1 << 18]))
def test_runs_extents_and_counts_match_the_naive_model(case, block: int) -> None:
    geo, chunks, bits = case
    old = bitmap_module.UNPACK_BYTES
    bitmap_module.UNPACK_BYTES = block
    try:
        runs = naive_runs(bits)
        assert list(bit_runs(iter(chunks))) == runs
        firsts, ends = run_arrays(iter(chunks))
        assert list(zip(firsts.tolist(), ends.tolist(), strict=True)) == runs
        expected = [
            (a * geo.granularity, min(b * geo.granularity, geo.virtual_size) - a * geo.granularity)
            for a, b in runs
        ]
        assert list(extents(geo, iter(chunks))) == expected
        starts, lengths = extent_arrays(geo, iter(chunks))
        assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == expected
        assert dirty_bytes(geo, iter(chunks)) == sum(n for _, n in expected)
        # Streamed: the same ranges, block by block, no block empty, none merged across.
        blocks = list(run_blocks(iter(chunks)))
        assert all(len(f) == len(e) > 0 for f, e in blocks)
        assert [r for f, e in blocks for r in zip(f.tolist(), e.tolist(), strict=True)] == runs
        streamed = [
            r
            for s, n in extent_blocks(geo, iter(chunks))
            for r in zip(s.tolist(), n.tolist(), strict=True)
        ]
        assert streamed == expected
    finally:
        bitmap_module.UNPACK_BYTES = old


def test_extent_arrays_survive_absurd_geometry() -> None:
    # A damaged header: 2^64 - 512 bytes at 2^40 bytes per bit; int64 would overflow.
    geo = Geometry((1 << 64) - 512, 1 << 40, 65536)
    chunks = [Chunk(0, 3, "data", np.array([0b101], np.uint8)), Chunk(3, geo.nbits - 3, "zero")]
    starts, lengths = extent_arrays(geo, iter(chunks))
    assert starts.tolist() == [0, 2 << 40] and lengths.tolist() == [1 << 40, 1 << 40]


# -- real images, cross-checked with QEMU --------------------------------------------


@pytest.fixture(scope="module")
def granular(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB, 64 KiB clusters, bitmap b0 at 512 B granularity: 4 table entries of 256 MiB.

    Writes land in entries 0 and 2 only.  Read-only; copy to edit.
    """
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    path = tmp_path_factory.mktemp("granular") / "granular.qcow2"
    qemu.create_image(path, 1 << 30)
    qemu.add_bitmap(path, "b0", granularity=512)
    qemu.qemu_io_write(path, [(MiB + 512, 4096), (600 * MiB, 512), (600 * MiB + 8192, 1536)])
    path.chmod(0o444)
    return path


def table_of(path: Path, name: str = "b0") -> tuple[int, int]:
    entry = next(e for e in qemu.bitmap_directory(path) if e["name"] == name)
    return entry["table_offset"], entry["table_size"]


def poke64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def ours(path: Path, name: str = "b0") -> list[tuple[int, int]]:
    with Image.open(path) as img:
        entry = next(e for e in img.read_directory().entries if e.display_name == name)
        return list(
            extents(
                Geometry(img.virtual_size, entry.granularity, img.cluster_size),
                iter_chunks(img, entry),
            )
        )


def test_data_entries_match_qemu(granular: Path) -> None:
    expected = [(MiB + 512, 4096), (600 * MiB, 512), (600 * MiB + 8192, 1536)]
    assert ours(granular) == expected == qemu.nbd_dirty_extents(granular, "b0")


def test_hand_edited_all_ones_and_zero_entries(granular: Path, tmp_path: Path) -> None:
    path = tmp_path / "edited.qcow2"
    shutil.copyfile(granular, path)
    table_offset, table_size = table_of(path)
    assert table_size == 4
    with Image.open(path) as img:
        entry = img.read_directory().entries[0]
        words = img.read_bitmap_table(entry).tolist()
    assert words[0] and words[2] and not words[1] and not words[3]
    poke64(path, table_offset + 8, 1)  # entry 1: all ones, no cluster
    poke64(path, table_offset + 16, 0)  # entry 2: all zeros (its cluster is leaked)
    poke64(path, table_offset + 24, 1)  # entry 3: all ones up to the disk's end
    expected = [(MiB + 512, 4096), (256 * MiB, 256 * MiB), (768 * MiB, 256 * MiB)]
    assert ours(path) == expected
    assert qemu.nbd_dirty_extents(path, "b0") == expected


def test_bit_order_is_lsb_first(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path / "lsb.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    granules = [3, 8, 13, 14, 15]  # bits 3 of byte 0; 0 of byte 1; 5, 6, 7 of byte 1
    qemu.qemu_io_write(path, [(g * 65536, 65536) for g in granules])
    table_offset, _ = table_of(path)
    with open(path, "rb") as f:
        f.seek(table_offset)
        data_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(data_offset)
        raw = f.read(4)
    assert raw == bytes([0b0000_1000, 0b1110_0001, 0, 0])
    with Image.open(path) as img:
        entry = img.read_directory().entries[0]
        assert read_bits(img, entry)[:2].tolist() == [0b0000_1000, 0b1110_0001]
    assert ours(path) == [(3 << 16, 1 << 16), (8 << 16, 1 << 16), (13 << 16, 3 << 16)]


def test_bits_past_the_disk_end_are_ignored(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    # 1 MiB + 512 B at 64 KiB per bit: 17 bits, the last granule only 512 bytes long.
    path = qemu.create_image(tmp_path / "tail.qcow2", MiB + 512)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(MiB, 512), (0, 512)])
    expected = [(0, 65536), (MiB, 512)]
    assert ours(path) == expected == qemu.nbd_dirty_extents(path, "b0")
    # Set every bit after bit 16 in the data cluster by hand.
    table_offset, _ = table_of(path)
    with open(path, "r+b") as f:
        f.seek(table_offset)
        data_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(data_offset + 2)
        assert f.read(1) == b"\x01"
        f.seek(data_offset + 2)
        f.write(b"\xff" * 65534)
    assert ours(path) == expected
    with Image.open(path) as img:
        entry = img.read_directory().entries[0]
        geo = Geometry(img.virtual_size, entry.granularity, img.cluster_size)
        assert dirty_bytes(geo, iter_chunks(img, entry)) == 65536 + 512
    assert qemu.nbd_dirty_extents(path, "b0") == expected


# -- lying sizes: bounded memory and time ---------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    from qbitmap.cli import cli
    try:
        cli(sys.argv[1:], prog_name="qbitmap")
        code = 0
    except SystemExit as exc:
        code = exc.code
    hwm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    print(json.dumps({"code": code, "hwm_kib": hwm}), file=sys.stderr)
    """
)


def run_child(*args: str) -> tuple[int, int, str]:
    """Run the CLI in a fresh interpreter; (exit code, peak RSS in KiB, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    *lines, last = proc.stderr.strip().splitlines()
    result = json.loads(last)
    return result["code"], result["hwm_kib"], "\n".join(lines)


@pytest.fixture(scope="module")
def lying_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("lying") / "base.qcow2"
    qemu.create_image(path, 1 << 30)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 65536)])
    path.chmod(0o444)
    return path


def sparse_copy(src: Path, dest: Path, size: int = 64 << 30) -> Path:
    shutil.copyfile(src, dest)
    os.truncate(dest, size)  # a 64 GiB sparse file: size checks against the file pass
    return dest


def bitmaps_ext_offset(path: Path) -> int:
    return next(o for o, m, _ in qemu.header_extensions(path) if m == 0x23852875) + 8


LYING = {
    # name: (edits as [(offset-from, field offset, struct format, value)], expected exit code)
    "table size 2^27-1, honest disk size": ([("entry", 8, ">I", (1 << 27) - 1)], 0),
    "table size 2^27-1 and a 2^60-byte disk": (
        [("entry", 8, ">I", (1 << 27) - 1), ("file", 24, ">Q", 1 << 60)],
        1,
    ),
    "2^60-byte disk, 1-entry table": ([("file", 24, ">Q", 1 << 60)], 0),
    "directory size 60 MiB": ([("ext", 8, ">Q", 60 << 20)], 1),
    "directory size 2^40": ([("ext", 8, ">Q", 1 << 40)], 1),
    "nb_bitmaps 2^32-1": ([("ext", 0, ">I", (1 << 32) - 1)], 1),
    "extra_data_size 2^32-1": ([("entry", 20, ">I", (1 << 32) - 1)], 1),
    "name_size 65535": ([("entry", 18, ">H", 65535)], 1),
}


@pytest.mark.parametrize("case", list(LYING))
def test_lying_sizes_are_read_in_bounded_memory(
    lying_base: Path, tmp_path: Path, case: str
) -> None:
    path = sparse_copy(lying_base, tmp_path / "lying.qcow2")
    entry_offset = qemu.bitmap_directory(path)[0]["entry_offset"]
    bases = {"file": 0, "ext": bitmaps_ext_offset(path), "entry": entry_offset}
    edits, expected_code = LYING[case]
    with open(path, "r+b") as f:
        for base, rel, fmt, value in edits:
            f.seek(bases[base] + rel)
            f.write(struct.pack(fmt, value))
    code, hwm, stderr = run_child("dump", "--json", "--extents", str(path))
    base_code, base_hwm, _ = run_child("dump", "--json", "--extents", str(lying_base))
    assert base_code == 0
    assert code == expected_code, stderr
    if code:
        assert (
            stderr.startswith(f"qbitmap: error: {path}: offset 0x") and "\n" not in stderr.strip()
        )
    # The honest image's run already holds every module; a lying size may add
    # at most a few MiB (the limit is far below what the lies would cost).
    assert hwm - base_hwm < 24 * 1024, (hwm, base_hwm)


def test_a_sound_table_is_what_the_classification_calls_sound() -> None:
    """bitmap_table_sound (the open scope's fast path) agrees with bitmap_table_entries."""
    import random

    from qbitmap.format.entries import bitmap_table_entries, bitmap_table_sound

    rng = random.Random(3)
    words = [0, 1, 1 << 9, 1 << 16, 3 << 16, (1 << 16) | 1, 2, 1 << 56, 1 << 60, (5 << 16) | 0x100]
    for cluster_size in (512, 4096, 65536, 1 << 21):
        for _ in range(400):
            picks = [
                rng.choice(words) if rng.random() < 0.9 else rng.getrandbits(64)
                for _ in range(rng.randrange(0, 5))
            ]
            table = np.array(picks, dtype=np.uint64)
            expected = not bitmap_table_entries(table, cluster_size).invalid.any()
            assert bitmap_table_sound(table, cluster_size) == expected, (table, cluster_size)
