from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qemu
from crashdisk import CrashingDisk, SimulatedCrash

from qbitmap.recover import Options, recover

MiB = 1 << 20
SIZE = 256 * MiB
G = 65536

# Guest data at the last backup (the bitmaps' clear point).
BASE_WRITES = [(0, 2 * MiB), (40 * MiB, 3 * MiB), (200 * MiB, 64 * 1024)]
# Written after the backup and stored by a clean QEMU close: on disk in b0.
STORED_WRITES = [(10 * MiB, 128 * 1024)]
# Written by the QEMU that was then killed: missing from the on-disk bitmap.
CRASH_WRITES = [(512, 4096), (41 * MiB + 12345, 70000), (100 * MiB, MiB), (SIZE - 4096, 4096)]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def granules(writes, granularity: int, size: int = SIZE) -> list[tuple[int, int]]:
    out = []
    for off, length in writes:
        start = off // granularity * granularity
        end = min(size, -(-(off + length) // granularity) * granularity)
        out.append((start, end - start))
    return qemu.merge_extents(out)


def covers(extents, required) -> bool:
    """Every range of *required* lies inside the union of *extents*."""
    merged = qemu.merge_extents(extents)
    for start, length in qemu.merge_extents(required):
        if not any(s <= start and start + length <= s + n for s, n in merged):
            return False
    return True


@dataclass
class Crashed:
    image: Path
    backup: Path  # qcow2 copy of the guest data at the clear point
    backup_raw: Path
    tmp: Path

    @property
    def all_writes(self):
        return STORED_WRITES + CRASH_WRITES


def _build(dest: Path) -> Crashed:
    image = qemu.create_image(dest / "disk.qcow2", SIZE)
    qemu.qemu_io_write(image, BASE_WRITES, pattern=0x11)
    backup = dest / "backup.qcow2"
    qemu.qemu_img("convert", "-O", "qcow2", image, backup)
    backup_raw = dest / "backup.raw"
    qemu.qemu_img("convert", "-O", "raw", image, backup_raw)
    qemu.add_bitmap(image, "b0")
    qemu.add_bitmap(image, "b1", granularity=4096)
    qemu.qemu_io_write(image, STORED_WRITES, pattern=0x22)  # stored at the clean close
    qemu.crash_image(image, CRASH_WRITES, bitmaps=("b0", "b1"))
    return Crashed(image, backup, backup_raw, dest)


@pytest.fixture(scope="session")
def crashed_template(tmp_path_factory) -> Crashed:
    return _build(tmp_path_factory.mktemp("crashed"))


@pytest.fixture
def crashed(crashed_template: Crashed, tmp_path: Path) -> Crashed:
    """A fresh copy of an image whose QEMU was SIGKILLed (b0 and b1 in use)."""
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(crashed_template.image, image)
    return Crashed(image, crashed_template.backup, crashed_template.backup_raw, tmp_path)


def assert_qemu_accepts(image: Path, names=("b0", "b1")) -> None:
    """qemu-img check clean (no leaks), no in-use flag, and QEMU can use the bitmaps."""
    rc, report = qemu.img_check(image)
    assert rc == 0 and report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report
    bitmaps = qemu.img_bitmaps(image)
    for name in names:
        assert "in-use" not in bitmaps[name]["flags"], bitmaps
    out = image.parent / "converted.qcow2"
    qemu.qemu_img("convert", "-O", "qcow2", "--bitmaps", image, out)
    assert set(qemu.img_bitmaps(out)) >= set(names)
    out.unlink()


def run_cli(*args: str):
    from click.testing import CliRunner

    from qbitmap.cli import cli

    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


# -- crash sweeps ---------------------------------------------------------------------------


def count_ops(image: Path, options: Options, tmp: Path) -> int:
    probe = tmp / "probe.qcow2"
    shutil.copyfile(image, probe)
    disks: list[CrashingDisk] = []

    def wrap(d):
        disks.append(CrashingDisk(d, None))
        return disks[-1]

    recover(probe, options, disk_wrapper=wrap)
    return disks[0].ops


def crash_sweep(
    template: Path,
    options: Options,
    tmp: Path,
    *,
    expected_data: Path,
    after_crash: Callable[[Path], None],
    at_the_end: Callable[[Path], None],
    commits: bool = True,
    rerun: Callable[[Path], Options] | None = None,
) -> int:
    """Crash at every operation of recover on copies of *template*; returns the count.

    With *commits*, the crashes must land on both sides of the commit: the
    first cluster (header and extensions) as it was, and as recover wrote it.
    *rerun* gives the options of the run that finishes the job, from the
    crashed image (default: *options* again).
    """
    total = count_ops(template, options, tmp)
    assert total >= 3
    old_header = template.read_bytes()[:65536]
    sides = set()
    for crash_at in range(total):
        image = tmp / "crashed.qcow2"
        shutil.copyfile(template, image)
        power = bool(crash_at % 2)

        def wrap(d, n=crash_at, power=power):
            return CrashingDisk(d, n, lose_unflushed=power, rng=random.Random(n))

        with pytest.raises(SimulatedCrash):
            recover(image, options, disk_wrapper=wrap)
        sides.add(image.read_bytes()[:65536] == old_header)
        after_crash(image)
        recover(image, options if rerun is None else rerun(image))  # the rerun finishes the job
        at_the_end(image)
        assert qemu.images_identical(expected_data, image), crash_at
    assert sides == ({True, False} if commits else {True}), "crashes and the commit disagree"
    return total


def no_corruption(image: Path) -> None:
    rc, report = qemu.img_check(image)
    assert report.get("corruptions", 0) == 0 and rc in (0, 3), report


def clean(image: Path) -> None:
    rc, report = qemu.img_check(image)
    assert rc == 0, report


def run_probe(probe: str, tag: str, *args: object) -> tuple[dict, Any]:
    """Run *probe* in a fresh interpreter with *args* as its command line.

    *probe* is Python source that runs qbitmap's command line and then
    writes one line ``TAG <json>`` to stderr.  Returns the JSON report the
    command printed on stdout, and that tagged JSON.
    """
    proc = subprocess.run(
        [sys.executable, "-c", probe, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next(x for x in proc.stderr.splitlines() if x.startswith(tag + " "))
    return json.loads(proc.stdout), json.loads(line[len(tag) + 1 :])


def times_named(events: Iterable[Sequence[Any]], kind: str, file: str, size: int) -> np.ndarray:
    """How many times each byte of *file* was named by the ``(kind, file, offset, length)``
    events of *kind* (read-ahead requests, reads, pulls)."""
    out = np.zeros(size, dtype=np.int32)
    for k, f, offset, length in events:
        if k == kind and f == file:
            out[offset : offset + length] += 1
    return out
