"""``qbitmap.check`` returns the report ``qbitmap check --json`` prints, for every kind of image.

Every image of the corruption catalogue (real QEMU images, one field
changed), files that are not images, an image a running QEMU writer holds:
the API's report, as ``to_dict()`` and as typed attributes, is the JSON the
command prints, exit status included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import corrupt
import pytest
import qemu
from checkrun import run_check

import qbitmap


def assert_same_report(path: Path, *names: str) -> qbitmap.CheckReport:
    """The API's report on *path* is the command's JSON, and its attributes say the same."""
    args = [a for name in names for a in ("-b", name)]
    run = run_check("--json", *args, path)
    report = qbitmap.check(path, bitmaps=list(names) or None)
    assert report.to_dict() == run.json
    assert report.exit_code == run.exit_code == run.json["exit_code"]
    assert report.filename == run.json["filename"] and report.error == run.json["error"]
    assert [
        {
            "code": f.code,
            "severity": f.severity,
            "bitmap": f.bitmap,
            "offset": f.offset,
            "field": f.field,
            "message": f.message,
        }
        for f in report.findings
    ] == run.json["findings"]
    assert [
        {"name": b.name, "status": b.status, "levels": b.levels} for b in report.bitmaps
    ] == run.json["bitmaps"]
    return report


@pytest.mark.parametrize("edit", sorted(corrupt.EDITS))
def test_every_catalogue_image(base_image: Path, tmp_path: Path, edit: str) -> None:
    assert_same_report(corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit))


def test_a_clean_image_and_one_bitmap_of_it(base_image: Path, tmp_path: Path) -> None:
    path = tmp_path / "clean.qcow2"
    shutil.copyfile(base_image, path)
    report = assert_same_report(path)
    assert report.exit_code == qbitmap.ExitCode.OK and report.findings == ()
    assert [b.name for b in report.bitmaps] == ["b0", "b1"]
    assert [b.name for b in assert_same_report(path, "b1").bitmaps] == ["b1"]
    # A lone string is one name, not a sequence of one-letter names.
    assert qbitmap.check(path, bitmaps="b1").to_dict() == run_check("--json", "-b", "b1", path).json


def test_files_that_are_not_images(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 16))
    for path in (tmp_path / "missing.qcow2", tmp_path, fifo, raw):
        report = assert_same_report(path)
        assert report.exit_code == 1 and report.error
        assert [f.code for f in report.findings] == ["image-unreadable"]


def test_an_unknown_bitmap_name_is_a_usage_error(base_image: Path, tmp_path: Path) -> None:
    path = tmp_path / "clean.qcow2"
    shutil.copyfile(base_image, path)
    assert run_check("--json", "-b", "nope", path).exit_code == 64
    with pytest.raises(qbitmap.UsageError, match="no bitmap named 'nope'") as caught:
        qbitmap.check(path, bitmaps=["b0", "nope"])
    assert caught.value.exit_code == 64


def test_a_running_writer_wins_over_leaks(base_image: Path, tmp_path: Path) -> None:
    """check's precedence: 75 (held by a writer) before 3 (leaks)."""
    qemu.require_tools("qemu-img", "qemu-storage-daemon", "qemu-io")
    path = corrupt.apply(base_image, tmp_path / "leaky.qcow2", "leaked-cluster")
    assert assert_same_report(path).exit_code == qbitmap.ExitCode.LEAKS
    with qemu.StorageDaemon(path):
        report = assert_same_report(path)
    assert report.exit_code == qbitmap.ExitCode.BUSY == 75
    assert {"busy", "leak"} <= {f.severity for f in report.findings}
    assert {b.status for b in report.bitmaps} == {"in-use"}


def test_a_crash_is_exit_status_4(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-storage-daemon", "qemu-io")
    path = qemu.create_image(tmp_path / "crashed.qcow2", 64 << 20)
    qemu.crash_image(path, [(0, 4096)])
    report = assert_same_report(path)
    assert report.exit_code == qbitmap.ExitCode.IN_USE
    assert [(f.code, f.severity, f.bitmap, f.field) for f in report.findings] == [
        ("bitmap-in-use", "in-use", "b0", "flags")
    ]
    assert report.findings[0].offset is not None
    assert [(b.name, b.status) for b in report.bitmaps] == [("b0", "in-use")]


def test_a_report_is_frozen_and_its_dict_a_copy(base_image: Path, tmp_path: Path) -> None:
    path = tmp_path / "clean.qcow2"
    shutil.copyfile(base_image, path)
    report = qbitmap.check(path)
    document = report.to_dict()
    document["bitmaps"].clear()
    assert report.to_dict()["bitmaps"]
    with pytest.raises(AttributeError):
        report.exit_code = 2  # type: ignore[misc]
