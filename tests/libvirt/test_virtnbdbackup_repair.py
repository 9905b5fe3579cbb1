"""The issue's story with a real backup client: virtnbdbackup, a crash, checkpoints --repair.

A full and an incremental backup, a crash; the next incremental fails with
libvirt's error.  After ``checkpoints --repair --reference`` against
virtnbdrestore's restore of the chain, the next incremental succeeds and
copies only what changed, and a restore of the whole chain equals the disk.
After another crash, ``--repair`` without a reference lets it go on too
(copying the whole disk once).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu
from libvirt_harness import (
    LibvirtDaemons,
    TestDomain,
    qbitmap_repair,
    qbitmap_verdicts,
    virtnbdbackup,
    virtnbdrestore,
)

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def small(libvirtd: LibvirtDaemons, tmp_path: Path) -> Iterator[TestDomain]:
    qemu.require_tools("virtnbdbackup", "virtnbdrestore")
    dom = TestDomain(tmp_path, size="64M")
    try:
        dom.define()
        yield dom
    finally:
        TestDomain.remove(dom.name)


def data_bytes(log: str) -> int:
    return int(re.search(r"(\d+) bytes of data extents to backup", log).group(1))


def identical(a: Path, b: Path) -> bool:
    proc = qemu.qemu_img("compare", "-U", a, b, check=False)
    return proc.returncode == 0 and proc.stdout == "Images are identical.\n"


def test_repair_with_a_reference_then_without(small: TestDomain, tmp_path):
    domain = small
    backup = tmp_path / "backup"
    vda = domain.disks["vda"]
    domain.start()
    domain.write("10M", "2M", pattern=1)
    full = virtnbdbackup(domain, "full", backup)
    assert full.returncode == 0, full.stderr[-2000:]
    domain.stop_cleanly()  # virtnbdbackup.0 stored ...
    domain.start()  # ... and in use from here on
    domain.write("20M", "1M", pattern=2)
    inc = virtnbdbackup(domain, "inc", backup)  # virtnbdbackup.1: in QEMU's memory only
    assert inc.returncode == 0, inc.stderr[-2000:]
    domain.write("30M", "1M", pattern=3)
    domain.flush()
    domain.kill()
    assert qbitmap_verdicts(domain) == {"virtnbdbackup.0": "in-use", "virtnbdbackup.1": "missing"}

    domain.start()
    failed = virtnbdbackup(domain, "inc", backup)
    domain.stop_cleanly()
    assert failed.returncode != 0
    assert (
        "Failed to start backup: [checkpoint inconsistent: missing or broken bitmap "
        "'virtnbdbackup.1' for disk 'vda']" in failed.stderr
    )

    # The restore of the chain is the disk as of virtnbdbackup.1: what changed since is the
    # write at 30M.
    restored = virtnbdrestore(backup, tmp_path / "restore1")
    code, report = qbitmap_repair(domain, "--reference", f"vda={restored}")
    assert code == 0, report["repair"]
    done = sorted((r["checkpoint"], r["action"], r["mode"]) for r in report["repair"]["repairs"])
    assert done == [
        # Stored before virtnbdbackup.1 was made: the reference cannot vouch for it.
        ("virtnbdbackup.0", "recover", "full"),
        ("virtnbdbackup.1", "create", "reference"),
    ]
    assert qbitmap_verdicts(domain) == {"virtnbdbackup.0": "ok", "virtnbdbackup.1": "ok"}

    domain.start()
    inc = virtnbdbackup(domain, "inc", backup)
    assert inc.returncode == 0, inc.stderr[-2000:]
    assert data_bytes(inc.stderr) == MiB  # only what changed since virtnbdbackup.1
    domain.stop_cleanly()
    assert identical(virtnbdrestore(backup, tmp_path / "restore2"), vda)

    # Another crash, no reference at hand: every bit set, the chain goes on.
    domain.start()
    domain.write("40M", "1M", pattern=4)
    domain.flush()
    domain.kill()
    assert set(qbitmap_verdicts(domain).values()) == {"in-use"}
    code, report = qbitmap_repair(domain)
    assert code == 0, report["repair"]
    assert {(r["action"], r["mode"]) for r in report["repair"]["repairs"]} == {("recover", "full")}
    domain.start()
    inc = virtnbdbackup(domain, "inc", backup)
    assert inc.returncode == 0, inc.stderr[-2000:]
    assert data_bytes(inc.stderr) == SIZE  # the whole disk, once
    domain.stop_cleanly()
    assert identical(virtnbdrestore(backup, tmp_path / "restore3"), vda)
