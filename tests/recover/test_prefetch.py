"""recover --reference asks the kernel for the head of both files before its heavy imports.

The process spends its start-up importing numpy and the format layer; the
disks read the first bytes of IMAGE and FILE meanwhile.  The request is
advice: bounded, read-only, and it never blocks on or fails for an odd path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qbitmap.recover.prefetch import HEAD_BYTES, prefetch_heads

# Records every POSIX_FADV_WILLNEED request (path, offset, length) and the moment numpy is
# first imported, then runs the command line.
PROBE = """
import json, os, sys
events = []
real_advise = os.posix_fadvise
def advise(fd, offset, length, advice):
    if advice == os.POSIX_FADV_WILLNEED:
        events.append(["willneed", os.readlink(f"/proc/self/fd/{fd}"), offset, length])
    return real_advise(fd, offset, length, advice)
os.posix_fadvise = advise

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not any(e[0] == "numpy" for e in events):
            events.append(["numpy", "", 0, 0])
        return None
sys.meta_path.insert(0, Watch())
from qbitmap.cli import cli
try:
    cli(sys.argv[1:], prog_name="qbitmap", standalone_mode=False)
finally:
    sys.stdout.flush()
    sys.stderr.write("EVENTS " + json.dumps(events) + "\\n")
"""


def _events(*args: object) -> tuple[dict, list[list]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next(x for x in proc.stderr.splitlines() if x.startswith("EVENTS "))
    return json.loads(proc.stdout), json.loads(line[len("EVENTS ") :])


def test_both_heads_are_asked_for_before_numpy_loads(crashed):
    report, events = _events(
        "recover", "--json", "--dry-run", "--reference", crashed.backup, crashed.image
    )
    assert report["status"] == "dry-run"
    kinds = [e[0] for e in events]
    assert "numpy" in kinds
    before = events[: kinds.index("numpy")]
    wanted = {
        (os.path.realpath(p), 0, min(HEAD_BYTES, os.path.getsize(p)))
        for p in (crashed.image, crashed.backup)
    }
    assert {(path, offset, length) for _, path, offset, length in before} == wanted


def test_no_head_is_asked_for_without_a_reference(crashed):
    report, events = _events("recover", "--json", "--dry-run", "--mode", "full", crashed.image)
    assert report["status"] == "dry-run"
    heads = [e for e in events if e[0] == "willneed" and e[2] == 0 and e[3] > 0]
    assert not [e for e in heads if e[1] == os.path.realpath(crashed.image)]


def test_odd_paths_are_passed_over(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would wait for a writer
    directory = tmp_path / "dir"
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.touch()
    prefetch_heads([fifo, directory, empty, tmp_path / "missing"])
