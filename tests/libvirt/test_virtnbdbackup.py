"""A real backup client on the harness: virtnbdbackup full + incremental, virtnbdrestore, a crash.

What phase two's repair tests build on: the chain of backups restores to the
disk exactly, a crash breaks the next incremental with libvirt's error, and
qbitmap's remedy for an in-use checkpoint lets the chain go on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu
from click.testing import CliRunner
from libvirt_harness import (
    LibvirtDaemons,
    TestDomain,
    qbitmap_checkpoints,
    qbitmap_verdicts,
    virtnbdbackup,
    virtnbdrestore,
)

from qbitmap.cli import cli


@pytest.fixture
def small(libvirtd: LibvirtDaemons, tmp_path: Path) -> Iterator[TestDomain]:
    """A test domain with a 64 MiB disk: a fully dirty bitmap makes virtnbdbackup copy it all."""
    qemu.require_tools("virtnbdbackup", "virtnbdrestore")
    dom = TestDomain(tmp_path, size="64M")
    try:
        dom.define()
        yield dom
    finally:
        TestDomain.remove(dom.name)


def compare(a, b) -> tuple[int, str]:
    proc = qemu.qemu_img("compare", "-U", a, b, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def data_bytes(log: str) -> int:
    """What virtnbdbackup says it copies: '[N] bytes of data extents to backup'."""
    return int(re.search(r"(\d+) bytes of data extents to backup", log).group(1))


def test_full_and_incremental_restore_to_the_disk(small: TestDomain, tmp_path):
    domain = small
    backup = tmp_path / "backup"
    domain.start()
    domain.write("10M", "2M", pattern=1)
    full = virtnbdbackup(domain, "full", backup)
    assert full.returncode == 0, full.stderr[-2000:]
    domain.write("50M", "1M", pattern=2)
    inc = virtnbdbackup(domain, "inc", backup)
    assert inc.returncode == 0, inc.stderr[-2000:]
    assert data_bytes(inc.stderr) == 1 << 20  # only what changed since the full backup
    domain.stop_cleanly()
    assert domain.checkpoint_names() == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert qbitmap_verdicts(domain) == {"virtnbdbackup.0": "ok", "virtnbdbackup.1": "ok"}
    restored = virtnbdrestore(backup, tmp_path / "restore")
    assert compare(restored, domain.disks["vda"]) == (0, "Images are identical.\n")


def test_a_crash_breaks_the_next_incremental_and_recover_full_lets_it_go_on(
    small: TestDomain, tmp_path
):
    domain = small
    backup = tmp_path / "backup"
    domain.start()
    domain.write("10M", "2M", pattern=1)
    assert virtnbdbackup(domain, "full", backup).returncode == 0
    domain.stop_cleanly()  # virtnbdbackup.0 is stored in the image
    domain.start()  # ... and marked in use again
    domain.write("40M", "1M", pattern=3)
    domain.kill()
    code, _report = qbitmap_checkpoints(domain)
    assert code == 4 and qbitmap_verdicts(domain) == {"virtnbdbackup.0": "in-use"}
    domain.start()
    failed = virtnbdbackup(domain, "inc", backup)
    assert failed.returncode != 0
    assert (
        "Failed to start backup: [checkpoint inconsistent: missing or broken bitmap "
        "'virtnbdbackup.0' for disk 'vda']" in failed.stderr
    )
    domain.stop_cleanly()
    vda = str(domain.disks["vda"])
    recovered = CliRunner().invoke(cli, ["recover", "--mode", "full", vda], catch_exceptions=False)
    assert recovered.exit_code == 0, recovered.output
    domain.start()
    inc = virtnbdbackup(domain, "inc", backup)
    assert inc.returncode == 0, inc.stderr[-2000:]
    assert data_bytes(inc.stderr) == 64 << 20  # every bit set: the whole disk, once
    domain.stop_cleanly()
    restored = virtnbdrestore(backup, tmp_path / "restore")
    assert compare(restored, domain.disks["vda"]) == (0, "Images are identical.\n")
