"""``qbitmap dump IMAGE...``: each image in turn, JSON Lines, 1 when any could not be read.

Real processes, images made by QEMU (one crashed by SIGKILL, one damaged
with struct), a FIFO and a missing file among them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import corrupt
import pytest
import qemu
from dumprun import dump_process

MiB = 1 << 20


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, base_image: Path) -> dict[str, Path]:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    root = tmp_path_factory.mktemp("dump-fleet")
    out = {"clean": root / "clean.qcow2", "crashed": root / "crashed.qcow2"}
    shutil.copyfile(base_image, out["clean"])
    shutil.copyfile(base_image, out["crashed"])
    qemu.crash_image(out["crashed"], [(10 * MiB, 65536)], bitmaps=("b0",))
    # A bitmap table past the end of the file: dump cannot read it (exit 1 alone).
    out["damaged"] = corrupt.apply(base_image, root / "damaged.qcow2", "table-offset-past-eof")
    out["fifo"] = root / "fifo"
    os.mkfifo(out["fifo"])
    out["missing"] = root / "missing.qcow2"
    return out


def test_json_lines_one_object_per_image_read(fleet: dict[str, Path]) -> None:
    order = ["damaged", "clean", "fifo", "crashed", "missing"]
    result = dump_process("--json", "--extents", *(fleet[n] for n in order))
    assert result.exit_code == 1, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["filename"] for o in objects] == [str(fleet["clean"]), str(fleet["crashed"])]
    for obj, name in zip(objects, ("clean", "crashed"), strict=True):
        alone = dump_process("--json", "--extents", fleet[name])
        assert alone.exit_code == 0 and json.loads(alone.stdout) == obj
    errors = [line for line in result.stderr.splitlines() if line.startswith("qbitmap: error:")]
    assert len(errors) == 3
    for name, error in zip(("damaged", "fifo", "missing"), errors, strict=True):
        assert error.startswith(f"qbitmap: error: {fleet[name]}: "), error
    assert "offset 0x" in errors[0] and "FIFO" in errors[1] and "No such file" in errors[2]
    # A warning among several images says which image it is about.
    warning = next(line for line in result.stderr.splitlines() if "warning" in line)
    assert warning.startswith(f"qbitmap: warning: {fleet['crashed']}: bitmap 'b0' is in use")
    assert "Traceback" not in result.stderr


def test_every_image_read_is_status_0_stale_bitmaps_included(fleet: dict[str, Path]) -> None:
    result = dump_process("--output=json", fleet["clean"], fleet["crashed"], fleet["clean"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_tables_for_people_one_image_after_the_other(fleet: dict[str, Path]) -> None:
    result = dump_process(
        fleet["clean"], fleet["missing"], fleet["crashed"], env={"COLUMNS": "100"}
    )
    assert result.exit_code == 1
    rows = [line.split() for line in result.stdout.splitlines()]
    files = [row[-1] for row in rows if row and row[0] == "file"]
    assert files == [str(fleet["clean"]), str(fleet["crashed"])]
    assert result.stderr.count("qbitmap: error:") == 1


def test_lines_take_one_image(fleet: dict[str, Path]) -> None:
    result = dump_process("--lines", fleet["clean"], fleet["crashed"])
    assert result.exit_code == 64 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--lines" in result.stderr
    assert dump_process("--lines", "-b", "b0", fleet["clean"]).exit_code == 0


def test_a_bitmap_name_one_image_lacks_fails_that_image_only(
    fleet: dict[str, Path], tmp_path: Path
) -> None:
    other = qemu.create_image(tmp_path / "other.qcow2", 16 * MiB)
    result = dump_process("--json", "-b", "b1", fleet["clean"], other)
    assert result.exit_code == 1
    (obj,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert [b["name"] for b in obj["bitmaps"]] == ["b1"]
    assert result.stderr == f"qbitmap: error: {other}: no bitmap named 'b1'\n"
    assert dump_process("-b", "b1", other).exit_code == 64  # alone: a usage error


def test_backing_chains_one_after_the_other(fleet: dict[str, Path], tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    qemu.qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(fleet["clean"]), "-F", "qcow2", str(overlay)
    )
    result = dump_process("--backing-chain", "--json", overlay, fleet["missing"], fleet["clean"])
    assert result.exit_code == 1
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(o["backing_chain"]) for o in objects] == [2, 1]
    assert result.stderr.count("qbitmap: error:") == 1
