"""``dump`` streams dirty ranges: its peak memory does not grow with their number.

A bitmap whose bits alternate has one range per two bits: 16 M ranges in
4 MiB of bitmap data.  Holding them as arrays took 2.1 GB for 67 M ranges.
Each output form now runs in a fresh interpreter on the same geometry with
4 times as many ranges, and its peak resident memory (VmHWM, which a parent's
peak cannot leak into) must stay within a small margin.  The images are made
by QEMU (its own bitmap, its own data clusters, allocated by writes); struct
then fills each data cluster with an alternating pattern, which QEMU reads
as it is (``qemu-nbd -B``/``nbdinfo`` agree on a smaller one below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import corrupt
import pytest
import qemu

GiB = 1 << 30
GRANULARITY = 512
# Guest bytes one 64 KiB bitmap data cluster covers at 512-byte granularity.
PER_DATA_CLUSTER = 65536 * 8 * GRANULARITY
# What a fourfold number of ranges may add to the peak: well under the 16 bytes
# per range that holding their starts and lengths would take (6 or 12 M more here).
MARGIN_KIB = 64 * 1024

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


def alternating(path: Path, size: int, pattern: int = 0x55) -> Path:
    """A *size*-byte disk whose bitmap b0 (512 B granularity) has *pattern* in every data byte."""
    qemu.create_image(path, size)
    qemu.add_bitmap(path, "b0", granularity=GRANULARITY)
    # One write per data cluster's span makes QEMU allocate every data cluster.
    qemu.qemu_io_write(path, [(i, 512) for i in range(0, size, PER_DATA_CLUSTER)], unsafe=True)
    lay = corrupt.layout(path)
    for word in lay.table("b0"):
        corrupt.write_bytes(path, word & 0x00FFFFFFFFFFFE00, bytes([pattern]) * lay.cluster_size)
    path.chmod(0o444)
    return path


def peak_kib(*args: object) -> int:
    """Run ``qbitmap ARGS`` in a fresh interpreter, output to /dev/null; its VmHWM in KiB."""
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, *map(str, args)],
            stdout=devnull,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
            check=False,
        )
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    return int(result["hwm_kib"])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Alternating bitmaps with 2, 4, 8 and 16 M dirty ranges."""
    qemu.require_tools("qemu-img", "qemu-io")
    root = tmp_path_factory.mktemp("many-ranges")
    return {n: alternating(root / f"alt-{n}m.qcow2", n * GiB) for n in (2, 4, 8, 16)}


def test_the_alternating_bitmap_is_what_qemu_reads(tmp_path: Path) -> None:
    """On a small disk QEMU's own export of the bitmap is one range per two granules."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    path = alternating(tmp_path / "small.qcow2", 8 * 1024 * 1024, pattern=0x0F)
    expected = [(start, 4 * GRANULARITY) for start in range(0, 8 << 20, 8 * GRANULARITY)]
    assert qemu.nbd_dirty_extents(path, "b0") == expected
    proc = subprocess.run(
        [sys.executable, "-m", "qbitmap", "dump", "--lines", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout == "".join(f"{s} {n}\n" for s, n in expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("form", "few", "many"),
    [
        (["--json", "--extents"], 4, 16),
        (["--lines"], 4, 16),
        (["--extents"], 2, 8),  # the table for people is slower to print: fewer ranges
    ],
    ids=["json", "lines", "human"],
)
def test_peak_memory_does_not_grow_with_the_number_of_ranges(
    images: dict[int, Path], form: list[str], few: int, many: int
) -> None:
    small = peak_kib("dump", *form, images[few])
    large = peak_kib("dump", *form, images[many])
    assert large - small < MARGIN_KIB, (
        f"{' '.join(form)}: {few} M ranges peaked at {small} KiB, {many} M at {large} KiB"
    )
