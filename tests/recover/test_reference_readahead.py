"""The reference comparison's read path, judged against QEMU's own reading.

Every pair is compared twice: by ``diff_bits`` and, as the oracle, granule
by granule over both sides as ``qemu-img convert -O raw`` reads them.  The
read path must find exactly those granules whatever the layout (compressed
clusters, zero clusters, backing files, odd sizes, shared clusters, a raw or
a qcow2 reference) and whatever the task, block and read-ahead sizes; read
every file byte at most once; ask the kernel to read ahead only bytes it
reads; and name the file, offset and field of what it cannot read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import qemu

from qbitmap.errors import ImageFormatError
from qbitmap.format.guest import COMPRESSED, GuestDisk
from qbitmap.recover import reference
from qbitmap.recover.reference import diff_bits

MiB = 1 << 20
G = 65536


def raw_of(path, tmp_path, name) -> np.ndarray:
    out = tmp_path / f"{name}.oracle.raw"
    qemu.qemu_img("convert", "-O", "raw", path, out)
    return np.fromfile(out, dtype=np.uint8)


def oracle(image, ref, tmp_path, size, granularity=G) -> list[int]:
    """Granules whose bytes differ as QEMU reads both sides (past an end: zeros)."""
    a = raw_of(image, tmp_path, "image")[:size]
    b = raw_of(ref, tmp_path, "ref")[:size]
    a = np.pad(a, (0, size - len(a)))
    b = np.pad(b, (0, size - len(b)))
    n = -(-size // granularity)
    diff = np.pad(a != b, (0, n * granularity - size))
    return np.flatnonzero(diff.reshape(n, granularity).any(axis=1)).tolist()


def found(bits) -> list[int]:
    return np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist()


def scribble(path, seed, size, *, n=24, zero_every=4):
    """Writes of random lengths and patterns, some of them zero writes, one qemu-io."""
    rng = np.random.default_rng(seed)
    cmds = []
    for i in range(n):
        length = int(rng.integers(1, 300_000))
        off = int(rng.integers(0, size - length))
        if i % zero_every == zero_every - 1:
            cmds.append(f"write -q -z {off} {length}")
        else:
            cmds.append(f"write -q -P {int(rng.integers(1, 255))} {off} {length}")
    qemu.qemu_io(path, *cmds)


@pytest.fixture(params=["small", "default"])
def sizes(request, monkeypatch):
    """The default sizes, and sizes small and odd enough that every boundary falls
    inside pieces, blocks, granules and compressed clusters."""
    if request.param == "small":
        monkeypatch.setattr(reference, "CHUNK_BYTES", 3 * 65536)
        monkeypatch.setattr(reference, "BLOCK_BYTES", 5 * 4096 + 512)
        monkeypatch.setattr(reference, "READAHEAD_BYTES", 100_000)
        monkeypatch.setattr(reference, "TASK_PIECES", 3)
        monkeypatch.setattr(reference, "HINT_BYTES", 8192)
    return request.param


def _compressed(src, dest, *, extended_l2=False, zstd=False):
    opts = "compression_type=" + ("zstd" if zstd else "zlib")
    if extended_l2:
        opts += ",extended_l2=on"
    qemu.qemu_img("convert", "-c", "-O", "qcow2", "-o", opts, src, dest)
    return dest


@pytest.mark.parametrize(
    "layout",
    [
        "plain",
        "compressed_reference",
        "compressed_extended_l2_reference",
        "both_compressed_zstd",
        "backing_chain_image",
        "raw_reference",
        "odd_size_raw_reference",
        "extended_l2_image",
    ],
)
def test_exactly_the_granules_qemu_reads_as_different(tmp_path, sizes, layout):
    size = 24 * MiB
    backup = qemu.create_image(tmp_path / "backup.qcow2", size)
    scribble(backup, 1, size)
    ref = backup
    image = tmp_path / "image.qcow2"
    if layout == "backing_chain_image":
        base = tmp_path / "base.qcow2"
        qemu.qemu_img("convert", "-O", "qcow2", backup, base)
        qemu.create_image(image, None, backing=base, extended_l2=True)
    elif layout == "extended_l2_image":
        qemu.qemu_img("convert", "-O", "qcow2", "-o", "extended_l2=on", backup, image)
    else:
        qemu.qemu_img("convert", "-O", "qcow2", backup, image)
    scribble(image, 2, size, n=16)
    if layout == "compressed_reference":
        ref = _compressed(backup, tmp_path / "c.qcow2")
    elif layout == "compressed_extended_l2_reference":
        ref = _compressed(backup, tmp_path / "c.qcow2", extended_l2=True)
    elif layout == "both_compressed_zstd":
        ref = _compressed(backup, tmp_path / "c.qcow2", zstd=True)
        plain = tmp_path / "image-plain.qcow2"
        image.rename(plain)
        _compressed(plain, image, zstd=True)
        qemu.qemu_io(image, "write -q -P 0x5a 3000000 70000")  # and some plain clusters
    elif layout == "raw_reference":
        ref = tmp_path / "backup.raw"
        qemu.qemu_img("convert", "-O", "raw", backup, ref)
    elif layout == "odd_size_raw_reference":
        ref = tmp_path / "backup.raw"
        qemu.qemu_img("convert", "-O", "raw", backup, ref)
        os.truncate(ref, 17 * MiB + 12345)  # shorter, and not a multiple of anything
    expected = oracle(image, ref, tmp_path, size)
    assert expected, "the pair must differ somewhere"
    bits, stats = diff_bits(image, ref, virtual_size=size, granularity=G)
    assert found(bits) == expected
    assert stats.differing_granules == len(expected)
    if "compressed" in layout:
        with GuestDisk(ref) as disk:
            assert any(s.kind == COMPRESSED for s in disk.segments())
    # Never a byte twice: no more than each side's files hold.
    files = [image, *([tmp_path / "base.qcow2"] if layout == "backing_chain_image" else [])]
    assert stats.image_bytes_read <= sum(os.path.getsize(f) for f in files)
    assert stats.reference_bytes_read <= os.path.getsize(ref)


def test_zero_clusters_and_unallocated_ranges_are_never_read(tmp_path, sizes):
    size = 32 * MiB
    image = qemu.create_image(tmp_path / "image.qcow2", size)
    ref = qemu.create_image(tmp_path / "ref.qcow2", size)
    qemu.qemu_io_write(image, [(0, 8 * MiB)], zero=True)  # zero clusters vs unallocated
    qemu.qemu_io_write(ref, [(4 * MiB, 8 * MiB)], zero=True)
    qemu.qemu_io_write(image, [(20 * MiB, G)], pattern=0x31)  # data vs unallocated
    qemu.qemu_io_write(ref, [(20 * MiB + G, G)], pattern=0x00)  # zeros written as data
    bits, stats = diff_bits(image, ref, virtual_size=size, granularity=G)
    assert found(bits) == [20 * MiB // G]
    assert stats.compared_bytes == 2 * G
    assert stats.image_bytes_read == G and stats.reference_bytes_read == G


def test_clusters_shared_on_both_sides_are_skipped(tmp_path, sizes):
    base = qemu.create_image(tmp_path / "base.qcow2", 16 * MiB)
    qemu.qemu_io_write(base, [(0, 12 * MiB)], pattern=0x11)
    image = qemu.create_image(tmp_path / "image.qcow2", None, backing=base)
    ref = qemu.create_image(tmp_path / "ref.qcow2", None, backing=base, extended_l2=True)
    qemu.qemu_io_write(image, [(3 * MiB + 100, 10)], pattern=0x22)
    qemu.qemu_io_write(ref, [(9 * MiB, 4096)], pattern=0x11)  # the same bytes, written again
    bits, stats = diff_bits(image, ref, virtual_size=16 * MiB, granularity=G)
    assert found(bits) == [3 * MiB // G]
    assert stats.skipped_bytes >= 16 * MiB - G - 4096
    # image: its own cluster, with the base's under the other side's backing read
    assert stats.compared_bytes == G + 4096


def _compressed_ranges(path) -> dict[int, int]:
    """host offset -> length of every compressed cluster of *path*, from its allocation map."""
    with GuestDisk(path) as disk:
        return {
            where[1]: where[2]
            for seg in disk.segments()
            if seg.kind == COMPRESSED and (where := disk.file_range(seg))
        }


@pytest.mark.parametrize("extended_l2", [False, True])
def test_every_compressed_cluster_is_read_and_inflated_once(tmp_path, sizes, extended_l2):
    size = 16 * MiB
    src = qemu.create_image(tmp_path / "src.qcow2", size)
    qemu.qemu_io_write(src, [(i * 3 * G + 999, 2 * G) for i in range(40)], pattern=0x44)
    ref = _compressed(src, tmp_path / "ref.qcow2", extended_l2=extended_l2)
    # Subclusters: the image's writes split compressed clusters of the reference into
    # several pieces each (data, unallocated, data again, ...).
    image = qemu.create_image(tmp_path / "image.qcow2", size, extended_l2=True)
    qemu.qemu_io_write(image, [(i * 3 * G + 999, 2 * G) for i in range(40)], pattern=0x44)
    qemu.qemu_io_write(image, [(i * 3 * G + 5000, 7000) for i in range(0, 40, 3)], pattern=0x45)
    clusters = _compressed_ranges(ref)
    assert clusters
    with GuestDisk(image) as disk:
        assert any(s.start % G or s.length % G for s in disk.segments()), "no cluster split"
    bits, stats = diff_bits(image, ref, virtual_size=size, granularity=4096)
    assert found(bits) == oracle(image, ref, tmp_path, size, 4096)
    assert stats.reference_bytes_read == sum(clusters.values())


class _Recorder:
    """Every read-ahead request and every file read, in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, int, int, int]] = []
        self.lock = threading.Lock()
        real_advise, real_preadv, real_pread = os.posix_fadvise, os.preadv, os.pread

        def advise(fd, offset, length, advice):
            if advice == os.POSIX_FADV_WILLNEED:
                with self.lock:
                    self.events.append(("hint", fd, offset, length))
            return real_advise(fd, offset, length, advice)

        def preadv(fd, buffers, offset, *flags):
            n = real_preadv(fd, buffers, offset, *flags)
            with self.lock:
                self.events.append(("read", fd, offset, n))
            return n

        def pread(fd, length, offset):
            data = real_pread(fd, length, offset)
            with self.lock:
                self.events.append(("read", fd, offset, len(data)))
            return data

        monkeypatch.setattr(os, "posix_fadvise", advise)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pread", pread)

    def bytes_of(self, kind: str) -> dict[int, np.ndarray]:
        """Per fd, how many times each byte was named (only fds the reads touched)."""
        spans: dict[int, list[tuple[int, int]]] = {}
        for k, fd, off, n in self.events:
            if k == kind:
                spans.setdefault(fd, []).append((off, n))
        out = {}
        for fd, items in spans.items():
            end = max(o + n for o, n in items)
            count = np.zeros(end + 1, dtype=np.int32)
            for o, n in items:
                count[o : o + n] += 1
            out[fd] = count
        return out


def test_read_ahead_names_only_bytes_that_are_read_each_once_and_stays_bounded(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(reference, "CHUNK_BYTES", 4 * G)
    monkeypatch.setattr(reference, "READAHEAD_BYTES", 10 * G)
    monkeypatch.setattr(reference, "HINT_BYTES", 3 * G)
    size = 64 * MiB
    image = qemu.create_image(tmp_path / "image.qcow2", size)
    ref = qemu.create_image(tmp_path / "ref.qcow2", size)
    rng = np.random.default_rng(5)
    slots = rng.permutation(size // MiB)[:40]  # written out of order: host order != guest order
    qemu.qemu_io_write(ref, [(int(s) * MiB, MiB) for s in slots], pattern=0x61)
    qemu.qemu_io_write(image, [(int(s) * MiB, MiB) for s in slots[5:]], pattern=0x61)
    qemu.qemu_io_write(image, [(int(s) * MiB + 512, 512) for s in slots[::7]], pattern=0x62)
    rec = _Recorder(monkeypatch)
    bits, stats = diff_bits(image, ref, virtual_size=size, granularity=G)
    monkeypatch.undo()
    assert found(bits) == oracle(image, ref, tmp_path, size)
    hinted, read = rec.bytes_of("hint"), rec.bytes_of("read")
    assert hinted, "nothing was read ahead"
    assert len(hinted) == 2, "both files are read ahead"
    # No start-up pull in a library call: every byte is asked for with the rest.
    for key, count in hinted.items():
        assert count.max() == 1, "a byte was asked for twice"
        got = read.get(key, np.zeros(0, np.int32))
        got = np.pad(got, (0, max(0, len(count) - len(got))))
        assert not np.any((count > 0) & (got[: len(count)] == 0)), "a byte asked for, never read"
        assert all(n <= 3 * G for kind, k, _off, n in rec.events if kind == "hint" and k == key)
    # Bounded: what is asked for and not yet read never exceeds the window, the tasks the
    # workers hold (ordered_map's bound) and one request, per file.  The requests come from
    # their own thread, after the planning: they can only lag behind it.
    limit = 10 * G + (4 * 2 + 2) * 4 * G + 3 * G
    pending: dict[int, np.ndarray] = {}  # per file: asked for, not read yet
    done: dict[int, np.ndarray] = {}  # per file: read
    outstanding: dict[int, int] = {}
    for kind, key, off, n in rec.events:
        if key not in pending:
            pending[key] = np.zeros(size * 2, dtype=bool)
            done[key] = np.zeros(size * 2, dtype=bool)
            outstanding[key] = 0
        was = pending[key][off : off + n]
        if kind == "hint":
            new = ~done[key][off : off + n] & ~was
            outstanding[key] += int(np.count_nonzero(new))
            was |= new
        else:
            outstanding[key] -= int(np.count_nonzero(was))
            was[:] = False
            done[key][off : off + n] = True
        assert outstanding[key] <= limit
    assert stats.compared_bytes > 0
    assert not any(t.name == "qbitmap-hints" for t in threading.enumerate())


def test_an_unreadable_l2_table_of_the_reference_is_named(tmp_path):
    from corrupt import poke

    size = 8 * MiB
    image = qemu.create_image(tmp_path / "image.qcow2", size)
    ref = qemu.create_image(tmp_path / "ref.qcow2", size)
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x01)
    qemu.qemu_io_write(ref, [(0, MiB)], pattern=0x02)
    l1_offset = int.from_bytes(ref.read_bytes()[40:48], "big")
    poke(ref, l1_offset, ">Q", (1 << 63) | (1 << 40))  # L2 table far past the end of the file
    with pytest.raises(ImageFormatError) as info:
        diff_bits(image, ref, virtual_size=size, granularity=G)
    assert str(ref) in str(info.value)
    assert info.value.offset is not None and info.value.field == "L1 entry"
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())


SCRIPT = shutil.which("qbitmap", path=str(Path(sys.executable).parent)) or "qbitmap"


def _at_reference_data_read(reference, action: str, nth: int | str) -> list[str]:
    """strace making the *nth* data read (``preadv``/``preadv2``, a worker's) of *reference*
    do *action* (``signal=SIGINT``, ``error=EIO``)."""
    qemu.require_tools("strace")
    calls = "preadv,preadv2"
    return [
        *("strace", "-f", "-qq", "-o", "/dev/null", "-P", str(reference)),
        *("-e", f"trace={calls}", "-e", f"inject={calls}:{action}:when={nth}"),
    ]


@pytest.mark.parametrize("nth", [1, 3])
def test_ctrl_c_while_the_workers_compare_is_exit_130_and_leaves_the_image(crashed, nth):
    before = crashed.image.read_bytes()
    proc = subprocess.run(
        [
            *_at_reference_data_read(crashed.backup, "signal=SIGINT", nth),
            *(SCRIPT, "recover", "--reference", str(crashed.backup), str(crashed.image)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (130, "qbitmap: interrupted\n")
    assert crashed.image.read_bytes() == before


def test_a_read_error_on_a_worker_is_one_line_naming_the_reference(crashed):
    before = crashed.image.read_bytes()
    proc = subprocess.run(
        [
            *_at_reference_data_read(crashed.backup, "error=EIO", "2+"),
            *(SCRIPT, "recover", "--reference", str(crashed.backup), str(crashed.image)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbitmap: error: "), proc.stderr
    assert str(crashed.backup) in lines[0] and "read at 0x" in lines[0], lines[0]
    assert "Input/output error" in lines[0]
    assert crashed.image.read_bytes() == before
