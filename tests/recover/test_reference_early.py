"""recover --reference has the storage read both files while it checks the image.

The comparison is opened under the write lock before the check runs and asks
the kernel for its first read-ahead window then; it must still ask only for
bytes it reads, each once, and a check that refuses must refuse as before.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import qemu
from corrupt import poke
from recover_helpers import CRASH_WRITES, STORED_WRITES, granules, times_named

from qbitmap.errors import RefusedError
from qbitmap.recover import Options, engine, prefetch, recover

G = 65536


class _Events:
    """Read-ahead requests (handed to their thread: "ask"; made: "hint") and reads of the image
    and the reference, and the check, in order."""

    def __init__(self, monkeypatch, files: dict[str, Path]) -> None:
        self.events: list[tuple[str, str, int, int]] = []
        self.lock = threading.Lock()
        ids = {os.stat(p).st_ino: name for name, p in files.items()}
        real_advise, real_preadv = os.posix_fadvise, os.preadv
        real_check = engine.check_image
        real_ask = prefetch.Hints.ask

        def which(fd: int) -> str | None:
            return ids.get(os.fstat(fd).st_ino)

        def advise(fd, offset, length, advice):
            name = which(fd)
            if advice == os.POSIX_FADV_WILLNEED and name:
                with self.lock:
                    self.events.append(("hint", name, offset, length))
            return real_advise(fd, offset, length, advice)

        def preadv(fd, buffers, offset, *flags):
            n = real_preadv(fd, buffers, offset, *flags)
            name = which(fd)
            if name:
                with self.lock:
                    self.events.append(("read", name, offset, n))
            return n

        def ask(hints, fd, start, end):
            name = which(fd)
            if name:
                with self.lock:
                    self.events.append(("ask", name, start, end - start))
            return real_ask(hints, fd, start, end)

        def check(*args, **kwargs):
            with self.lock:
                self.events.append(("check", "", 0, 0))
            return real_check(*args, **kwargs)

        monkeypatch.setattr(os, "posix_fadvise", advise)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(engine, "check_image", check)
        monkeypatch.setattr(prefetch.Hints, "ask", ask)

    def first(self, kind: str, name: str = "") -> int:
        return next(i for i, e in enumerate(self.events) if e[0] == kind and e[1] == name)


def test_both_files_are_read_ahead_before_the_check_and_only_bytes_read_once(crashed, monkeypatch):
    files = {"image": crashed.image, "reference": crashed.backup}
    rec = _Events(monkeypatch, files)
    report = recover(crashed.image, Options(reference=crashed.backup))
    monkeypatch.undo()
    assert report.status == "recovered"
    check = rec.first("check")
    for name, path in files.items():
        # Handed to the requests' thread before the check runs: the storage reads meanwhile.
        assert rec.first("ask", name) < check, f"{name}: no read-ahead before the check"
        size = path.stat().st_size
        hinted = times_named(rec.events, "hint", name, size)
        read = times_named(rec.events, "read", name, size)
        assert hinted.any(), f"{name}: nothing asked for"
        assert hinted.max() == 1, f"{name}: a byte was asked for twice"
        assert not np.any((hinted > 0) & (read == 0)), f"{name}: a byte asked for, never read"
    ref = report.reference
    assert ref is not None
    assert ref["image_bytes_read"] <= crashed.image.stat().st_size
    assert ref["reference_bytes_read"] <= crashed.backup.stat().st_size
    # The comparison started early is the one used: b0 gets exactly the writes since the backup.
    b0 = qemu.merge_extents(qemu.nbd_dirty_extents(crashed.image, "b0"))
    assert b0 == granules([*STORED_WRITES, *CRASH_WRITES], G)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("qbitmap-")]


def test_an_image_the_check_refuses_is_refused_unchanged_with_a_reference(crashed):
    """An L1 entry past the end of the file: the early comparison cannot plan, the check
    refuses; the refusal is the check's, and no byte changes."""
    data = crashed.image.read_bytes()
    l1_offset = int.from_bytes(data[40:48], "big")
    poke(crashed.image, l1_offset, ">Q", (1 << 63) | (1 << 40))
    before = crashed.image.read_bytes()
    with pytest.raises(RefusedError) as info:
        recover(crashed.image, Options(reference=crashed.backup))
    assert "metadata outside the bitmaps is unsound" in str(info.value)
    assert crashed.image.read_bytes() == before
    assert not any(t.name == "qbitmap-worker" for t in threading.enumerate())
