"""Disks examined by forked workers give exactly what one process gives."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import qemu
from libvirt_files import Disk, Host

from qbitmap.libvirt import ImageCache, domain_files, examine_domain_files, parallel
from qbitmap.libvirt.parallel import examine_disks


@pytest.fixture
def host(tmp_path) -> Host:
    """Three domains x two disks, a shared backing file, in-use, missing and orphan bitmaps."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    host = Host(tmp_path)
    base = qemu.create_image(host.images / "base.qcow2", 64 << 20)
    qemu.add_bitmap(base, "cp1")
    for d in range(3):
        disks = []
        for target in ("vda", "vdb"):
            top = host.images / f"vm{d}-{target}.qcow2"
            qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
            qemu.add_bitmap(top, "cp1")
            qemu.add_bitmap(top, f"orphan{d}")
            disks.append(Disk(target, str(top)))
        host.define(f"vm{d}", disks)
        host.checkpoint(f"vm{d}", "cp1", disks=(("vda", "bitmap"), ("vdb", "bitmap")))
        host.checkpoint(f"vm{d}", "cp2", parent="cp1", disks=(("vda", "bitmap"),))
    qemu.crash_image(host.images / "vm1-vdb.qcow2", [(0, 65536)], bitmaps=("cp1",))
    return host


def reports(host: Host, jobs: int) -> list[dict]:
    out = examine_domain_files(
        domain_files(host.config_dir), checkpoint_dir=host.checkpoint_dir, jobs=jobs
    )
    return [r.to_dict() for r in out]


def test_workers_agree_with_one_process(host):
    one = reports(host, jobs=1)
    three = reports(host, jobs=3)
    assert json.dumps(three, sort_keys=True) == json.dumps(one, sort_keys=True)
    verdicts = {
        (r["domain"], c["name"], d["disk"]): d["verdict"]
        for r in one
        for c in r["checkpoints"]
        for d in c["disks"]
    }
    assert verdicts[("vm1", "cp1", "vdb")] == "in-use"
    assert verdicts[("vm0", "cp2", "vda")] == "missing"
    assert verdicts[("vm2", "cp1", "vda")] == "ok"


def test_a_failing_worker_is_redone_in_the_parent(host, monkeypatch):
    disks = [d for path in domain_files(host.config_dir) for d in _domain(path).disks]
    expected = [
        pickle.dumps(parallel._portable(s)) for s in examine_disks(disks, ImageCache(), jobs=1)
    ]
    real_worker = parallel._worker

    def broken_worker(write_fd, all_disks, share):
        if share[0] == 1:  # the first worker dies without an answer
            os._exit(3)
        real_worker(write_fd, all_disks, share)

    monkeypatch.setattr(parallel, "_worker", broken_worker)
    got = examine_disks(disks, ImageCache(), jobs=3)
    assert [pickle.dumps(parallel._portable(s)) for s in got] == expected


def _domain(path):
    from qbitmap.libvirt import read_domain

    return read_domain(path)
