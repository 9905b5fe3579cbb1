"""``qbitmap check IMAGE...``: each image in turn, JSON Lines, the worst status, none stops others.

Every run is the real program (stdout and stderr being pipes); the images
are made by QEMU and edited with struct (tests/corrupt.py), one crashed by
SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import corrupt
import pytest
import qemu

MiB = 1 << 20
CHECK_KEYS = {"filename", "findings", "bitmaps", "exit_code", "error"}


def qbitmap(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "100"},
    )


def json_lines(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert stdout.endswith("\n") and all(line.startswith("{") for line in lines), stdout
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, base_image: Path) -> dict[str, Path]:
    """One image per verdict of check, a FIFO and a missing file."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    root = tmp_path_factory.mktemp("fleet")
    out = {"clean": root / "clean.qcow2"}
    shutil.copyfile(base_image, out["clean"])
    out["crashed"] = root / "crashed.qcow2"
    shutil.copyfile(base_image, out["crashed"])
    qemu.crash_image(out["crashed"], [(10 * MiB, 65536)], bitmaps=("b0", "b1"))
    out["corrupt"] = corrupt.apply(base_image, root / "corrupt.qcow2", "type-2")
    out["leaky"] = corrupt.apply(base_image, root / "leaky.qcow2", "data-refcount-2")
    out["fifo"] = root / "fifo"
    os.mkfifo(out["fifo"])
    out["missing"] = root / "missing.qcow2"
    for path in out.values():
        if path.is_file():
            path.chmod(0o444)
    return out


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["clean", "leaky"], 3),
        (["clean", "leaky", "crashed"], 4),
        (["leaky", "crashed", "corrupt", "clean"], 2),
        (["corrupt", "fifo", "clean"], 1),
        (["clean", "missing"], 1),
        (["clean", "clean"], 0),
    ],
)
def test_exit_status_is_the_worst_by_checks_precedence(
    fleet: dict[str, Path], names: list[str], expected: int
) -> None:
    proc = qbitmap("check", "--json", *(fleet[n] for n in names))
    assert proc.returncode == expected, proc.stderr
    objects = json_lines(proc.stdout)
    assert [o["filename"] for o in objects] == [str(fleet[n]) for n in names]
    alone = {n: qbitmap("check", fleet[n]).returncode for n in set(names)}
    for name, obj in zip(names, objects, strict=True):
        assert set(obj) == CHECK_KEYS
        assert obj["exit_code"] == alone[name], name


def test_an_image_that_cannot_be_read_never_stops_the_others(fleet: dict[str, Path]) -> None:
    order = ["fifo", "crashed", "missing", "corrupt", "leaky", "clean"]
    proc = qbitmap("check", "--json", *(fleet[n] for n in order))
    assert proc.returncode == 1
    objects = json_lines(proc.stdout)
    assert [o["exit_code"] for o in objects] == [1, 4, 1, 2, 3, 0]
    assert "FIFO" in objects[0]["error"] and "No such file" in objects[2]["error"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qbitmap: error: ")]
    assert errors == [
        f"qbitmap: error: {fleet['fifo']}: is a FIFO; an image is a regular file or a block device",
        f"qbitmap: error: {fleet['missing']}: cannot open: No such file or directory",
    ]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("qbitmap: warning:")]
    assert warnings == [
        f"qbitmap: warning: {fleet['crashed']}: in-use bitmaps (metadata sound) (exit 4)",
        f"qbitmap: warning: {fleet['corrupt']}: corruption found (exit 2)",
        f"qbitmap: warning: {fleet['leaky']}: leaked clusters only (exit 3)",
    ]
    assert "Traceback" not in proc.stderr
    quiet = qbitmap("-q", "check", "--json", *(fleet[n] for n in order))
    assert quiet.stdout == proc.stdout
    assert quiet.stderr.splitlines() == errors


def test_reports_for_people_follow_each_other_and_end_with_a_summary(
    fleet: dict[str, Path],
) -> None:
    order = ["clean", "crashed", "fifo"]
    proc = qbitmap("check", *(fleet[n] for n in order))
    assert proc.returncode == 1
    images = [line for line in proc.stdout.splitlines() if line.startswith("Image: ")]
    assert images == [f"Image: {fleet[n]}" for n in order]
    results = [line for line in proc.stdout.splitlines() if line.startswith("Result: ")]
    assert results == [
        "Result: all bitmaps consistent (exit 0)",
        "Result: in-use bitmaps (metadata sound) (exit 4)",
        "Result: could not check the image (exit 1)",
        "Result: exit 1",
    ]
    summary = proc.stdout[proc.stdout.index("Over 3 images:") :]
    assert f"1 could not check the image (exit 1): {fleet['fifo']}" in summary
    assert f"1 in-use bitmaps (metadata sound) (exit 4): {fleet['crashed']}" in summary
    assert "1 all bitmaps consistent (exit 0)" in summary


def test_one_image_is_checked_as_before(fleet: dict[str, Path]) -> None:
    """No summary, no warning line, one JSON object: the form scripts already parse."""
    proc = qbitmap("check", fleet["crashed"])
    assert proc.returncode == 4 and "Over" not in proc.stdout and proc.stderr == ""
    proc = qbitmap("check", "--json", fleet["fifo"])
    assert proc.returncode == 1 and len(json_lines(proc.stdout)) == 1


def test_a_bitmap_name_one_image_lacks_fails_that_image_only(
    fleet: dict[str, Path], tmp_path: Path
) -> None:
    qemu.require_tools("qemu-img")
    other = qemu.create_image(tmp_path / "other.qcow2", 16 * MiB)
    qemu.add_bitmap(other, "daily")
    proc = qbitmap("check", "--json", "-b", "b1", fleet["clean"], other, fleet["crashed"])
    assert proc.returncode == 1, proc.stderr
    objects = json_lines(proc.stdout)
    assert [o["exit_code"] for o in objects] == [0, 1, 4]
    assert [b["name"] for b in objects[0]["bitmaps"]] == ["b1"]
    assert objects[1]["error"] == f"{other}: no bitmap named 'b1'"
    assert objects[1]["findings"] == [] and objects[1]["bitmaps"] == []
    assert f"qbitmap: error: {other}: no bitmap named 'b1'\n" in proc.stderr
    # Alone, the same name is a usage error, as it always was.
    assert qbitmap("check", "-b", "b1", other).returncode == 64


def test_backing_chains_one_after_the_other(fleet: dict[str, Path], tmp_path: Path) -> None:
    qemu.require_tools("qemu-img")
    overlay = tmp_path / "overlay.qcow2"
    qemu.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(fleet["clean"]), "-F", "qcow2", str(overlay)
    )
    proc = qbitmap("check", "--backing-chain", "--json", overlay, fleet["crashed"])
    assert proc.returncode == 4, proc.stderr
    objects = json_lines(proc.stdout)
    assert [o["filename"] for o in objects] == [str(overlay), str(fleet["crashed"])]
    assert [len(o["backing_chain"]) for o in objects] == [2, 1]
    assert [o["exit_code"] for o in objects] == [0, 4]


def test_usage_errors_concern_the_whole_command_line(fleet: dict[str, Path]) -> None:
    for args, needle in (
        (["--prometheus", "--json"], "--prometheus and --json"),
        (["--prometheus", "--backing-chain"], "--backing-chain"),
        (["--output=human", "--json"], "--output=human and --json"),
    ):
        proc = qbitmap("check", *args, fleet["clean"], fleet["leaky"])
        assert proc.returncode == 64, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr
    proc = qbitmap("check")
    assert proc.returncode == 64 and "Missing argument 'IMAGE...'" in proc.stderr


def test_an_image_a_running_writer_holds_ranks_after_1_and_before_2(
    fleet: dict[str, Path], tmp_path: Path
) -> None:
    """75 (held) wins over 2, 4 and 3 among the images, and 1 wins over it."""
    qemu.require_tools("qemu-img", "qemu-storage-daemon")
    held = tmp_path / "held.qcow2"
    shutil.copyfile(fleet["clean"], held)
    held.chmod(0o644)
    with qemu.StorageDaemon(held, writable=True):
        proc = qbitmap("check", "--json", fleet["corrupt"], held, fleet["crashed"], fleet["leaky"])
        assert proc.returncode == 75, proc.stderr
        assert [o["exit_code"] for o in json_lines(proc.stdout)] == [2, 75, 4, 3]
        proc = qbitmap("check", "--json", held, fleet["missing"])
        assert proc.returncode == 1, proc.stderr
        assert [o["exit_code"] for o in json_lines(proc.stdout)] == [75, 1]
        assert f"qbitmap: warning: {held}: " in proc.stderr
