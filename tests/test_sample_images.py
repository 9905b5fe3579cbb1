"""examples/crashed.qcow2 is what examples/make-sample.sh says, and the README's examples run.

crashed.qcow2 is examples/sample.qcow2 after a QEMU process (qemu-io) that
had it open read-write was killed by SIGKILL with three writes made: both
bitmaps in use, their contents those of sample.qcow2, the writes missing;
qemu-img check clean; qbitmap check exit 4.  The script is run again here
and must make the same images, and the README's ``recover`` session is
replayed command by command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

import qemu

REPO = TESTS.parent
EXAMPLES = REPO / "examples"
SAMPLE, CRASHED = EXAMPLES / "sample.qcow2", EXAMPLES / "crashed.qcow2"
KiB, MiB = 1 << 10, 1 << 20
# The writes of the crashed session, as make-sample.sh documents them: (pattern, offset, length).
CRASH_WRITES = [
    (0x51, 16 * MiB, 64 * KiB),
    (0x52, 500 * MiB, 64 * KiB),
    (0x53, 1000 * MiB + 64 * KiB, 4 * KiB),
]


def qbitmap(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def extents(path: Path) -> dict[str, list[list[int]]]:
    proc = qbitmap("dump", "--json", "--extents", path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return {b["name"]: [[e["start"], e["length"]] for e in b["extents"]] for b in report["bitmaps"]}


def test_the_crashed_sample_is_small() -> None:
    assert CRASHED.stat().st_size < 2 * MiB
    assert CRASHED.stat().st_blocks * 512 < 2 * MiB


def test_both_bitmaps_are_left_in_use_and_qemu_finds_no_error() -> None:
    qemu.require_tools("qemu-img")
    bitmaps = qemu.img_bitmaps(CRASHED)
    assert {n: b["flags"] for n, b in bitmaps.items()} == {
        "weekly": ["in-use"],
        "daily": ["in-use", "auto"],
    }
    assert {n: b["granularity"] for n, b in bitmaps.items()} == {"weekly": MiB, "daily": 64 * KiB}
    check = qemu.qemu_img("check", "--output=json", CRASHED, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout).get("corruptions", 0) == 0


def test_qbitmap_check_exits_4_with_both_bitmaps_in_use() -> None:
    proc = qbitmap("check", "--json", CRASHED)
    assert proc.returncode == 4, proc.stderr
    report = json.loads(proc.stdout)
    assert {b["name"]: b["status"] for b in report["bitmaps"]} == {
        "weekly": "in-use",
        "daily": "in-use",
    }
    assert {f["code"] for f in report["findings"]} == {"bitmap-in-use"}
    assert qbitmap("check", SAMPLE).returncode == 0


def test_the_crash_stored_nothing_and_the_writes_are_in_the_guest_data() -> None:
    """On disk, the bitmaps are sample.qcow2's; the guest data has the three writes."""
    qemu.require_tools("qemu-io")
    assert extents(CRASHED) == extents(SAMPLE)
    for pattern, offset, length in CRASH_WRITES:
        assert qemu.guest_read(CRASHED, offset, length) == bytes([pattern]) * length
        assert qemu.guest_read(SAMPLE, offset, length) == bytes(length)


def test_make_sample_makes_the_same_images(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io")
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "make-sample.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for made, kept in ((tmp_path / "sample.qcow2", SAMPLE), (tmp_path / "crashed.qcow2", CRASHED)):
        assert qemu.img_bitmaps(made) == qemu.img_bitmaps(kept)
        assert extents(made) == extents(kept)
        compare = qemu.qemu_img("compare", "-U", made, kept, check=False)
        assert compare.returncode == 0, compare.stdout


def test_the_readme_recover_session_runs_as_shown(tmp_path: Path) -> None:
    """Each ``$`` command of the README's recover example, its output as printed there."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## `qbitmap recover`") :]
    block = re.search(r"```console\n(.*?)```", section, re.DOTALL)
    assert block is not None
    (tmp_path / "examples").symlink_to(EXAMPLES)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "COLUMNS": "90", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("NO_COLOR", None)
    commands: list[tuple[str, list[str]]] = []
    for line in block.group(1).splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            commands[-1][1].append(line)
    assert [c for c, _ in commands if "recover" in c], "the block shows no recovery"
    for command, shown in commands:
        proc = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, (command, proc.stderr)
        got = [line.rstrip() for line in proc.stdout.splitlines()]
        assert got == [line.rstrip() for line in shown], command
