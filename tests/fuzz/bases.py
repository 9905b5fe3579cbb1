"""The base images of the differential fuzz test, each made by QEMU's own tools.

Every mutant starts from one of these.  They differ where qcow2 readers
differ: cluster size (512 B, 4 KiB, 64 KiB), refcount width (2, 8, 16, 64
bits), extended L2 entries, compressed clusters, an internal snapshot (so
an L2 table and data clusters are shared between the active L1 and the
snapshot's L1), bitmaps with data clusters, all-zero bitmaps (table
entries 0) and disabled ones, and bitmaps left in use by a real crash: a
writer killed with SIGKILL (a ``qemu-storage-daemon`` writing through NBD,
or a ``qemu-io`` process) after its writes were flushed.

Two edits are made with ``struct`` after QEMU is done, both recorded here:

* the internal snapshot's date fields are set to a fixed value, so a base
  is byte-for-byte the same every time it is built (QEMU stamps the wall
  clock) and a mutant id names the same bytes on every run;
* ``noauto64k`` is ``std64k`` with autoclear bit 0 ("bitmaps") cleared, the
  state a program without bitmap support leaves behind.  QEMU then ignores
  every bitmap.

:func:`build` caches the bytes per process and, when given a cache
directory, on disk (keyed by the recipe version and the QEMU version).
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import qemu

KiB, MiB = 1024, 1024 * 1024

#: Bump when a recipe changes: cached bases of another version are rebuilt.
RECIPE_VERSION = 2

#: Unix time written into every snapshot's date fields (2023-11-14).
SNAPSHOT_DATE = 1_700_000_000


def _io(path: Path, *cmds: str) -> None:
    qemu.qemu_io(path, *cmds)


def _fix_snapshot_dates(path: Path) -> None:
    """Overwrite date_sec/date_nsec of every snapshot table entry (QEMU stamps the clock)."""
    with open(path, "r+b") as f:
        head = f.read(72)
        nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", head, 60)
        pos = snapshots_offset
        for _ in range(nb_snapshots):
            f.seek(pos)
            fixed = f.read(40)
            id_size, name_size = struct.unpack_from(">HH", fixed, 12)
            extra_size = struct.unpack_from(">I", fixed, 36)[0]
            f.seek(pos + 16)
            f.write(struct.pack(">II", SNAPSHOT_DATE, 0))
            size = 40 + extra_size + id_size + name_size
            pos += (size + 7) & ~7


def _snapshot(path: Path, name: str) -> None:
    qemu.qemu_img("snapshot", "-c", name, path)
    _fix_snapshot_dates(path)


def _crash_qemu_io(path: Path, cmds: list[str], marker_offset: int, timeout: float = 60.0) -> None:
    """Run *cmds* in a read-write ``qemu-io``, flush, and SIGKILL it: a crash after a flush.

    qemu-io buffers its stdout when it is not a terminal, so progress is
    watched from outside.  After *cmds* and a ``flush`` it writes a marker
    (512 bytes of 0x7e at *marker_offset*, which must lie in a cluster that
    is already allocated, so that only data is written) and then sleeps; it
    is killed once a read-only, force-share reader sees the marker.  qemu-io
    runs its commands in order, so by then the flush has returned and the
    file is the same every time.  Every bitmap QEMU loaded is left in use.
    """
    qemu.require_tools("qemu-io")
    argv = ["qemu-io", "-f", "qcow2", os.fspath(path)]
    marker = f"-P 0x7e {marker_offset} 512"
    for c in [*cmds, "flush", f"write {marker}", "sleep 600000"]:
        argv += ["-c", c]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise qemu.QemuError(f"qemu-io exited early: {proc.stderr.read()!r}")
            seen = subprocess.run(
                ["qemu-io", "-r", "-U", "-f", "qcow2", os.fspath(path), "-c", f"read {marker}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if seen.returncode == 0 and "Pattern verification failed" not in seen.stdout:
                break
            if time.monotonic() > deadline:
                raise qemu.QemuError(f"qemu-io writes not visible after {timeout}s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def _guest_and_bitmaps(path: Path, size: int, cluster: int, *, compressed: bool = True) -> None:
    """Bitmaps b0 (enabled, granularity = max(cluster, 4 KiB)), bfine (512 B), bz (disabled,
    never dirtied: every table entry 0); guest data, dirtying b0 and bfine, stored at close."""
    qemu.add_bitmap(path, "b0", granularity=max(cluster, 4 * KiB))
    qemu.add_bitmap(path, "bfine", granularity=512)
    qemu.add_bitmap(path, "bz", disabled=True)
    cmds = [
        "write -P 0x11 0 192k",
        f"write -P 0x22 {size // 2} 64k",
        f"write -P 0x33 {size - 64 * KiB} 64k",
        "write -P 0x66 1000k 4k",  # a sub-cluster write for extended L2
    ]
    if compressed:
        # two compressed clusters, the second packed behind the first in one host cluster
        cmds += [
            f"write -c -P 0x44 {2 * MiB} {cluster}",
            f"write -c -P 0x45 {2 * MiB + cluster} {cluster}",
        ]
    _io(path, *cmds)


def _std(
    path: Path,
    size: int,
    cluster: int,
    *,
    rc_bits: int = 16,
    xl2: bool = False,
    snapshot: bool = True,
    compressed: bool = True,
) -> None:
    opts = [f"refcount_bits={rc_bits}"]
    qemu.create_image(path, size, cluster_size=cluster, extended_l2=xl2, extra_opts=opts)
    _guest_and_bitmaps(path, size, cluster, compressed=compressed)
    if snapshot:
        _snapshot(path, "s1")
        # after the snapshot: the active L1 gets its own copy of the first L2 table
        _io(path, f"write -P 0x55 {3 * MiB} 64k")


def std64k(path: Path) -> None:
    """64 KiB clusters, 64 MiB, refcount 16; b0/bfine with data, bz all zero and disabled;
    compressed clusters; snapshot s1 and a write after it.  Closed cleanly."""
    _std(path, 64 * MiB, 64 * KiB)


def crash64k(path: Path) -> None:
    """std64k, then a qemu-storage-daemon writing through NBD, SIGKILLed: every bitmap in use."""
    _std(path, 64 * MiB, 64 * KiB)
    qemu.crash_image(
        path, [(5 * MiB, 64 * KiB), (40 * MiB, 4 * KiB)], bitmaps=("b0", "bfine", "bz")
    )


def c512(path: Path) -> None:
    """512-byte clusters, 8 MiB, refcount 64: many L2 tables and refcount blocks, bfine's
    table spans several clusters; snapshot; closed cleanly."""
    _std(path, 8 * MiB, 512, rc_bits=64)


def crash512(path: Path) -> None:
    """512-byte clusters, 8 MiB, refcount 8, compressed clusters, no snapshot; a qemu-io
    writer SIGKILLed after a flush: every bitmap in use."""
    _std(path, 8 * MiB, 512, rc_bits=8, snapshot=False)
    _crash_qemu_io(path, ["write -P 0x77 5M 8k"], 8 * MiB - 512)


def xl2(path: Path) -> None:
    """Extended L2 entries (32 subclusters of 2 KiB), 64 KiB clusters, refcount 4, a 4 KiB
    write that allocates only some subclusters; snapshot; closed cleanly."""
    _std(path, 32 * MiB, 64 * KiB, rc_bits=4, xl2=True)


def crash4k(path: Path) -> None:
    """4 KiB clusters, refcount 2 (values 0..3), 16 MiB, compressed clusters, no snapshot;
    qemu-io SIGKILLed: bitmaps in use."""
    _std(path, 16 * MiB, 4 * KiB, rc_bits=2, snapshot=False)
    _crash_qemu_io(path, ["write -P 0x78 9M 4k", "write -z 10M 64k"], 16 * MiB - 512)


def noauto64k(path: Path) -> None:
    """std64k with autoclear bit 0 cleared: QEMU ignores (and on a read-write open drops)
    every bitmap; their clusters are leaks to qemu-img check."""
    std64k(path)
    with open(path, "r+b") as f:
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))


BASES: dict[str, Callable[[Path], None]] = {
    "std64k": std64k,
    "crash64k": crash64k,
    "c512": c512,
    "crash512": crash512,
    "xl2": xl2,
    "crash4k": crash4k,
    "noauto64k": noauto64k,
}

_CACHE: dict[str, bytes] = {}


def _qemu_version() -> str:
    out = qemu.qemu_img("--version").stdout
    return out.splitlines()[0] if out else "unknown"


def build(name: str, cache_dir: Path | None = None) -> bytes:
    """The bytes of base *name*, built by QEMU's tools (once per process, and once per
    QEMU version and recipe version in *cache_dir* if given)."""
    if name in _CACHE:
        return _CACHE[name]
    if name not in BASES:
        raise KeyError(f"unknown base {name!r}; known: {', '.join(BASES)}")
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    cached: Path | None = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{RECIPE_VERSION}/{_qemu_version()}".encode()).hexdigest()[:12]
        cached = Path(cache_dir) / f"{name}-{key}.qcow2"
        if cached.exists():
            _CACHE[name] = cached.read_bytes()
            return _CACHE[name]
    with tempfile.TemporaryDirectory(prefix="qbm-base-") as d:
        path = Path(d) / f"{name}.qcow2"
        BASES[name](path)
        data = path.read_bytes()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    _CACHE[name] = data
    return data


def write_base(name: str, dest: Path, cache_dir: Path | None = None) -> Path:
    """Write base *name* to *dest* (for a human); returns *dest*."""
    dest = Path(dest)
    dest.write_bytes(build(name, cache_dir))
    return dest


__all__ = ["BASES", "RECIPE_VERSION", "build", "write_base"]
