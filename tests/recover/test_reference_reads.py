"""The reference comparison reads bounded chunks into reused buffers.

Exactness must not depend on where chunks end, and the process must not hold
more than a few chunks of the files in memory, however large they are.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import qemu

from qbitmap.recover import reference
from qbitmap.recover.reference import diff_bits

MiB = 1 << 20


def _pair(tmp_path, *, size=64 * MiB, seed=7):
    a = qemu.create_image(tmp_path / "a.qcow2", size)
    b = qemu.create_image(tmp_path / "b.qcow2", size)
    rng = np.random.default_rng(seed)
    writes = sorted({int(x) * 65536 for x in rng.integers(0, size // 65536, 300)})
    qemu.qemu_io_write(a, [(o, 65536) for o in writes], pattern=0x11)
    # b holds the same data except every fifth cluster.
    qemu.qemu_io_write(b, [(o, 65536) for o in writes[::5]], pattern=0x22)
    qemu.qemu_io_write(b, [(o, 65536) for i, o in enumerate(writes) if i % 5], pattern=0x11)
    return a, b, writes


def test_result_does_not_depend_on_the_chunk_size(tmp_path, monkeypatch):
    a, b, writes = _pair(tmp_path)
    expected = {o // 65536 for o in writes[::5]}
    results = []
    for chunk in (4 * MiB, 65536, 3 * 65536):
        monkeypatch.setattr(reference, "CHUNK_BYTES", chunk)
        bits, _ = diff_bits(a, b, virtual_size=64 * MiB, granularity=65536)
        results.append(set(np.flatnonzero(np.unpackbits(bits, bitorder="little")).tolist()))
    assert results == [expected] * 3


def test_resident_memory_stays_bounded(tmp_path):
    # 192 MiB of data per side: the process must not hold the files in memory.
    size = 256 * MiB
    a = qemu.create_image(tmp_path / "a.qcow2", size)
    b = qemu.create_image(tmp_path / "b.qcow2", size)
    qemu.qemu_io_write(a, [(i * 16 * MiB, 16 * MiB) for i in range(12)], pattern=0x44)
    qemu.qemu_io_write(b, [(i * 16 * MiB, 16 * MiB) for i in range(12)], pattern=0x44)
    code = (
        "import sys\n"
        "from qbitmap.recover import reference\n"
        f"bits, stats = reference.diff_bits({str(a)!r}, {str(b)!r}, virtual_size={size}, "
        "granularity=65536)\n"
        "assert not bits.any(), 'identical data reported as different'\n"
        "assert stats.compared_bytes == 192 << 20, stats.compared_bytes\n"
        # VmHWM, not ru_maxrss: the latter inherits the parent's peak across
        # fork/vfork + exec, and the parent here is a long-running pytest.
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    peak_kib = int(out.stdout.strip())
    # Interpreter + numpy ~40 MiB, two 4 MiB buffers per worker.
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB: the data is held in memory"
