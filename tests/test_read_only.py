"""``dump`` and ``check`` never write to the image and never lock it: what the kernel sees.

CI runs as root, for whom ``chmod 444`` protects nothing, and a lock leaves
no trace once the process has ended.  So each command runs under ``strace
-f -P IMAGE``, which records every system call the process (and its
threads) makes on the image, by path or by descriptor, and the record is
held to the rules: the image is opened, only read-only; nothing writes,
truncates or maps it writable and shared; no lock is set (``F_OFD_GETLK``,
which only asks, is allowed), and its bytes are the same afterwards.  The
same judge run on ``recover`` finds its read-write open, its writes and
its lock bytes: the test can fail.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemu

MiB = 1 << 20
SCRIPT = shutil.which("qbitmap", path=str(Path(sys.executable).parent)) or "qbitmap"
TRACED = (
    "open,openat,openat2,creat,truncate,ftruncate,fallocate,write,writev,pwrite64,pwritev,"
    "pwritev2,copy_file_range,sendfile,mmap,fcntl,flock"
)
OPEN_CALLS = ("open", "openat", "openat2", "creat")
WRITE_CALLS = (
    "truncate",
    "ftruncate",
    "fallocate",
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "copy_file_range",
    "sendfile",
)
LOCK_COMMANDS = ("F_SETLK", "F_SETLKW", "F_OFD_SETLK", "F_OFD_SETLKW", "F_SETLK64", "F_SETLKW64")
CALL = re.compile(r"^(?:\[pid\s+)?\d*\]?\s*(\w+)\((.*)$")


@dataclass
class Verdict:
    opens: list[str]
    writable_opens: list[str]
    writes: list[str]
    shared_writable_maps: list[str]
    locks: list[str]


def judge(log: str) -> Verdict:
    """Sort the traced calls on the image into what a read-only, lock-free reader may not do."""
    verdict = Verdict([], [], [], [], [])
    for line in log.splitlines():
        match = CALL.match(line.strip())
        if not match or "resumed>" in line:
            continue
        name, args = match.groups()
        if name in OPEN_CALLS:
            verdict.opens.append(line)
            if name == "creat" or re.search(r"\bO_(WRONLY|RDWR|CREAT|TRUNC|APPEND)\b", args):
                verdict.writable_opens.append(line)
        elif name in WRITE_CALLS:
            verdict.writes.append(line)
        elif name == "mmap" and "PROT_WRITE" in args and "MAP_SHARED" in args:
            verdict.shared_writable_maps.append(line)
        elif name == "flock" or (name == "fcntl" and any(c in args for c in LOCK_COMMANDS)):
            verdict.locks.append(line)
    return verdict


def traced(
    image: Path, *args: object, tmp_path: Path
) -> tuple[subprocess.CompletedProcess, Verdict]:
    qemu.require_tools("strace")
    log = tmp_path / "strace.log"
    argv = ["strace", "-f", "-qq", "-o", str(log), "-P", str(image), "-e", f"trace={TRACED}"]
    proc = subprocess.run(
        [*argv, SCRIPT, *map(str, args), str(image)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc, judge(log.read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bitmaps in use after a SIGKILLed writer, plus leaked-free data: recover has work to do."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = qemu.create_image(tmp_path_factory.mktemp("ro") / "disk.qcow2", 256 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1", granularity=4096)
    qemu.qemu_io_write(path, [(0, MiB), (40 * MiB, 3 * MiB)])
    qemu.crash_image(path, [(100 * MiB, MiB), (200 * MiB, 4096)], bitmaps=("b0", "b1"))
    return path


READERS = [
    ["dump"],
    ["dump", "--extents"],
    ["dump", "--json", "--extents"],
    ["dump", "--lines"],
    ["check"],
    ["check", "--json"],
]


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_dump_and_check_only_read_and_take_no_lock(
    args: list[str], crashed: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(crashed, image)
    before = sha(image)
    proc, verdict = traced(image, *args, tmp_path=tmp_path)
    assert proc.returncode in (0, 4), proc.stderr
    assert verdict.opens, "the trace saw no open of the image: it proves nothing"
    assert verdict.writable_opens == []
    assert verdict.writes == []
    assert verdict.shared_writable_maps == []
    assert verdict.locks == []
    assert sha(image) == before


@pytest.mark.parametrize(
    "args", [["dump", "--json", "--extents"], ["check", "--json"]], ids=" ".join
)
def test_no_lock_and_no_write_while_a_writer_holds_the_image(
    args: list[str], crashed: Path, tmp_path: Path
) -> None:
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(crashed, image)
    with qemu.StorageDaemon(image, writable=True):
        proc, verdict = traced(image, *args, tmp_path=tmp_path)
        # Had we taken a lock, QEMU's would have refused us or us QEMU; it still holds its own.
        assert qemu.lock_bytes_held(image)
    assert proc.returncode in (0, 4, 75), proc.stderr
    assert verdict.opens and verdict.writable_opens == [] and verdict.writes == []
    assert verdict.locks == []


def test_the_judge_catches_a_writer_that_locks(crashed: Path, tmp_path: Path) -> None:
    """recover opens read-write, writes and holds QEMU's lock bytes: every rule above fires."""
    image = tmp_path / "disk.qcow2"
    shutil.copyfile(crashed, image)
    before = sha(image)
    proc, verdict = traced(image, "recover", "--mode", "full", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert verdict.writable_opens and verdict.writes and verdict.locks
    assert any("F_OFD_SETLK" in line and "F_RDLCK" in line for line in verdict.locks)
    assert sha(image) != before
