"""``qbitmap.recover`` returns the report ``qbitmap recover --json`` prints, or raises what the
command reports as an error, having written nothing.

The images are crashed by SIGKILLing a real QEMU writer (tests/recover_helpers.py);
QEMU judges the result (``qemu-img check``, ``qemu-img info``, its NBD export of the bitmaps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import corrupt
import pytest
import qemu
from recover_helpers import (
    CRASH_WRITES,
    SIZE,
    STORED_WRITES,
    Crashed,
    assert_qemu_accepts,
    covers,
    granules,
    run_cli,
    sha,
)

import qbitmap


def _twin(crashed: Crashed, name: str) -> tuple[Path, Path]:
    """Two copies of the crashed image, ``cli/NAME`` and ``api/NAME``, for two runs alike."""
    out = []
    for side in ("cli", "api"):
        (crashed.tmp / side).mkdir(exist_ok=True)
        copy = crashed.tmp / side / name
        shutil.copyfile(crashed.image, copy)
        out.append(copy)
    return out[0], out[1]


@pytest.mark.parametrize(
    ("options", "args"),
    [
        ({"mode": "full"}, ["--mode", "full"]),
        ({"mode": "full", "bitmaps": ["b1"], "dry_run": True}, ["--mode", "full", "-b", "b1", "-n"]),
        ({"reference": "BACKUP"}, ["--reference", "BACKUP"]),
        ({"reference": "RAW", "reference_format": "raw"}, ["--reference", "RAW", "--reference-format", "raw"]),
        ({"mode": "reference", "reference": "BACKUP", "dry_run": True}, ["--mode", "reference", "--reference", "BACKUP", "--dry-run"]),
    ],
    ids=["full", "one-bitmap-dry-run", "reference", "raw-reference", "reference-dry-run"],
)  # fmt: skip
def test_the_report_is_the_commands_json(
    crashed: Crashed, monkeypatch: pytest.MonkeyPatch, options: dict, args: list[str]
) -> None:
    paths = {"BACKUP": str(crashed.backup), "RAW": str(crashed.backup_raw)}
    options = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    args = [paths.get(a, a) for a in args]
    cli_copy, api_copy = _twin(crashed, "disk.qcow2")
    monkeypatch.chdir(cli_copy.parent)
    result = run_cli("recover", "--json", *args, "disk.qcow2")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(api_copy.parent)
    report = qbitmap.recover("disk.qcow2", **options)
    document = json.loads(result.stdout)
    assert report.to_dict() == document
    assert (report.filename, report.dry_run, report.status, report.exit_code) == (
        "disk.qcow2",
        bool(options.get("dry_run")),
        document["status"],
        0,
    )
    assert [
        (b.name, b.action, b.mode, b.reason, b.dirty_bytes_before, b.dirty_bytes_after)
        for b in report.bitmaps
    ] == [
        (
            b["name"],
            b["action"],
            b["mode"],
            b["reason"],
            b["dirty_bytes_before"],
            b["dirty_bytes_after"],
        )
        for b in document["bitmaps"]
    ]
    assert [(f.code, f.severity, f.bitmap) for f in report.findings] == [
        (f["code"], f["severity"], f["bitmap"]) for f in document["findings"]
    ]
    assert sha(api_copy) == sha(cli_copy)  # the same bytes written, or none


def test_a_recovered_bitmap_marks_every_write_and_qemu_accepts_it(crashed: Crashed) -> None:
    report = qbitmap.recover(crashed.image, reference=crashed.backup)
    assert report.status == "recovered" and report.warnings == ()
    assert [(b.name, b.action, b.mode) for b in report.bitmaps] == [
        ("b0", "recovered", "reference"),
        ("b1", "recovered", "reference"),
    ]
    assert_qemu_accepts(crashed.image)
    for name, granularity in (("b0", 65536), ("b1", 4096)):
        dirty = qemu.nbd_dirty_extents(crashed.image, name)
        assert covers(dirty, granules(STORED_WRITES + CRASH_WRITES, granularity)), name
    assert qbitmap.check(crashed.image).exit_code == 0


def test_a_dry_run_writes_nothing(crashed: Crashed) -> None:
    before = sha(crashed.image)
    report = qbitmap.recover(crashed.image, mode="full", dry_run=True)
    assert report.dry_run and report.status == "dry-run"
    assert report.to_dict()["writes"], "a dry run lists the writes a real run makes"
    assert sha(crashed.image) == before


def test_a_reference_of_another_size_is_a_warning(crashed: Crashed, tmp_path: Path) -> None:
    short = tmp_path / "short.raw"
    shutil.copyfile(crashed.backup_raw, short)
    with open(short, "r+b") as f:
        f.truncate(SIZE - (1 << 20))
    cli_copy, api_copy = _twin(crashed, "disk.qcow2")
    result = run_cli("recover", "--reference", short, cli_copy)
    assert result.exit_code == 0, result.output
    report = qbitmap.recover(api_copy, reference=short)
    (warning,) = report.warnings
    assert "compare as zeros" in warning
    assert warning.replace(str(api_copy), str(cli_copy)) in " ".join(result.stderr.split())


# -- failures: exceptions, nothing written ------------------------------------------------------


def _refused(image: Path, error: type[qbitmap.QbitmapError], words: str, **options) -> None:
    before = sha(image)
    with pytest.raises(error, match=words) as caught:
        qbitmap.recover(image, **options)
    assert sha(image) == before
    cli_args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key == "bitmaps":
            cli_args += [a for name in value for a in ("-b", name)]
        elif value is True:
            cli_args.append(flag)
        else:
            cli_args += [flag, str(value)]
    result = run_cli("recover", *cli_args, image)
    assert result.exit_code == caught.value.exit_code, result.output
    assert sha(image) == before


def test_usage_errors(crashed: Crashed) -> None:
    image = crashed.image
    _refused(image, qbitmap.UsageError, "needs --reference", mode="reference")
    _refused(image, qbitmap.UsageError, "full", mode="full", reference=crashed.backup)
    _refused(image, qbitmap.UsageError, "no bitmap named 'nope'", mode="full", bitmaps=["nope"])
    _refused(image, qbitmap.UsageError, "unknown mode|choose", mode="fast")
    _refused(image, qbitmap.UsageError, "is the image|same file", reference=image)
    with pytest.raises(qbitmap.UsageError, match="reference_format needs a reference"):
        qbitmap.recover(image, mode="full", reference_format="raw")


def test_no_mode_applies(crashed: Crashed) -> None:
    _refused(crashed.image, qbitmap.NoModeError, "full")


def test_a_running_writer_is_busy(crashed: Crashed) -> None:
    qemu.require_tools("qemu-storage-daemon", "qemu-io")
    with qemu.StorageDaemon(crashed.image):
        _refused(crashed.image, qbitmap.ImageBusyError, "locked by another process", mode="full")


def test_corrupt_metadata_is_refused(base_image: Path, tmp_path: Path) -> None:
    path = corrupt.apply(base_image, tmp_path / "broken.qcow2", "table-entry-reserved-bit")
    _refused(path, qbitmap.RefusedError, "drop-broken", mode="full")
    report = qbitmap.recover(path, mode="full", drop_broken=True)
    assert [(b.name, b.action) for b in report.bitmaps] == [("b0", "dropped")]
    assert set(qemu.img_bitmaps(path)) == {"b1"}


def test_leaks_are_kept_when_asked(base_image: Path, tmp_path: Path) -> None:
    path = corrupt.apply(base_image, tmp_path / "leaky.qcow2", "leaked-cluster")
    kept = qbitmap.recover(path, reclaim_leaks=False)
    assert kept.status == "nothing-to-do" and qbitmap.check(path).exit_code == 3
    freed = qbitmap.recover(path)
    assert freed.status == "leaks-reclaimed" and freed.to_dict()["leaked_clusters_reclaimed"] == 1
    assert qbitmap.check(path).exit_code == 0


def test_files_that_are_not_images(tmp_path: Path) -> None:
    with pytest.raises(qbitmap.ImageIOError, match="is a directory"):
        qbitmap.recover(tmp_path, mode="full")
    with pytest.raises(qbitmap.ImageIOError, match="cannot open"):
        qbitmap.recover(tmp_path / "missing.qcow2", mode="full")
