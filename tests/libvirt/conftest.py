"""Fixtures of the libvirt tests: one real libvirtd per session, a fresh domain per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from libvirt_harness import LibvirtDaemons, TestDomain


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[LibvirtDaemons]:
    """virtlogd + libvirtd, started for the session and stopped after it, whatever happens."""
    daemons = LibvirtDaemons()
    try:
        daemons.start()
        yield daemons
    finally:
        daemons.stop()


@pytest.fixture
def domain(libvirtd: LibvirtDaemons, tmp_path: Path) -> Iterator[TestDomain]:
    """A defined, shut-off test domain with one 256 MiB qcow2 disk (vda); removed after."""
    dom = TestDomain(tmp_path)
    try:
        dom.define()
        yield dom
    finally:
        TestDomain.remove(dom.name)
