"""The ``qbitmap check`` command: output forms, options, exit codes, hostile names."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import corrupt
import pytest
import qemu
from checkrun import run_check
from click.testing import CliRunner

from qbitmap.check import CODES, CheckReport, Finding, Severity, check_image, check_path
from qbitmap.cli import cli
from qbitmap.errors import ImageIOError
from qbitmap.format import Image


def test_listed_in_help():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "check" in result.stdout.split("Commands:")[1]


def test_help_mentions_exit_codes():
    result = CliRunner().invoke(cli, ["check", "--help"])
    assert result.exit_code == 0
    for word in ("--json", "--bitmap", "Exit status"):
        assert word in result.stdout


def test_human_output(base_image, tmp_path):
    img = corrupt.apply(base_image, tmp_path / "x.qcow2", "in-use")
    run = run_check(img)
    assert run.exit_code == 4
    assert "bitmap-in-use" in run.stdout
    assert "b0" in run.stdout and "in-use" in run.stdout
    assert "Result: in-use bitmaps" in run.stdout
    assert "\x1b[" not in run.stdout  # no colour on a pipe


def test_json_shape(base_image, tmp_path):
    img = corrupt.apply(base_image, tmp_path / "x.qcow2", "granularity-8")
    report = run_check("--json", img).json
    assert set(report) == {"filename", "findings", "bitmaps", "exit_code", "error"}
    assert report["error"] is None
    assert report["filename"] == str(img)
    finding = next(f for f in report["findings"] if f["code"] == "bitmap-granularity-invalid")
    assert finding == {
        "code": "bitmap-granularity-invalid",
        "severity": "corrupt",
        "bitmap": "b0",
        "offset": corrupt.layout(img).entry("b0").offset + 17,
        "field": "granularity_bits",
        "message": finding["message"],
    }
    for b in report["bitmaps"]:
        assert set(b) == {"name", "status", "levels"}


def test_bitmap_filter(base_image, tmp_path):
    img = corrupt.apply(base_image, tmp_path / "x.qcow2", "type-2")  # b0 corrupt, b1 fine
    run = run_check("--json", "-b", "b1", img)
    assert run.exit_code == 0
    assert [b["name"] for b in run.json["bitmaps"]] == ["b1"]
    assert run.json["findings"] == []
    run = run_check("--json", "--bitmap", "b0", "-b", "b1", img)
    assert run.exit_code == 2
    assert [b["name"] for b in run.json["bitmaps"]] == ["b0", "b1"]


def test_bitmap_filter_keeps_image_findings(base_image, tmp_path):
    img = corrupt.apply(base_image, tmp_path / "x.qcow2", "l2-past-eof")
    run = run_check("--json", "-b", "b1", img)
    assert run.exit_code == 2
    assert "l2-table-invalid" in run.codes()


def test_unknown_bitmap_is_a_usage_error(base_image):
    run = run_check("-b", "nope", base_image)
    assert run.exit_code == 64
    assert "no bitmap named 'nope'" in run.stderr


def test_unknown_bitmap_on_a_broken_directory_reports_the_damage(base_image, tmp_path):
    img = corrupt.apply(base_image, tmp_path / "x.qcow2", "dir-offset-past-eof")
    run = run_check("--json", "-b", "b0", img)
    assert run.exit_code == 2


def test_a_directory_is_not_an_image_exit_1(tmp_path):
    run = run_check("--json", tmp_path)
    assert run.exit_code == 1 and run.json["exit_code"] == 1
    assert [f["code"] for f in run.json["findings"]] == ["image-unreadable"]
    assert (
        run.json["error"]
        == f"{tmp_path}: is a directory; an image is a regular file or a block device"
    )


@pytest.mark.parametrize("what", ["missing", "empty", "text"])
def test_unreadable_inputs_exit_1_with_json(what, tmp_path):
    path = tmp_path / "x.qcow2"
    if what == "empty":
        path.write_bytes(b"")
    elif what == "text":
        path.write_text("hello world, not a disk image\n" * 10)
    run = run_check("--json", path)
    assert run.exit_code == 1
    assert run.json["exit_code"] == 1
    assert [f["code"] for f in run.json["findings"]] == ["image-unreadable"]
    human = run_check(path)
    assert human.exit_code == 1
    assert "image-unreadable" in human.stdout
    assert "Traceback" not in human.stdout + human.stderr


def test_usage_errors_exit_64():
    assert run_check().exit_code == 64
    assert run_check("--nope", "x").exit_code == 64


def test_hostile_bitmap_names_are_not_markup(base_image, tmp_path):
    img = tmp_path / "x.qcow2"
    corrupt.apply(base_image, img, "in-use")
    lay = corrupt.layout(img)
    name = b"[bold red]x[/bold red]\x1b[31m\nz"
    corrupt.rewrite_directory(
        lay, [(lay.entries[0], b"", name), (lay.entries[1], b"", lay.entries[1].name)]
    )
    run = run_check(img)
    assert run.exit_code == 4
    assert "[bold red]x[/bold red]" in run.stdout
    assert "\x1b" not in run.stdout
    assert "\\x1b[31m" in run.stdout
    report = run_check("--json", img).json
    assert report["bitmaps"][0]["name"] == name.decode()


def test_exit_code_precedence():
    def report(*codes):
        return CheckReport("x", [Finding(c, "m") for c in codes])

    assert report().exit_code == 0
    assert report("image-dirty").exit_code == 0
    assert report("bitmap-cluster-leaked").exit_code == 3
    assert report("bitmap-cluster-leaked", "bitmap-in-use").exit_code == 4
    assert report("bitmap-in-use", "bitmap-type-invalid", "bitmap-cluster-leaked").exit_code == 2
    assert report("bitmap-type-invalid", "image-read-error").exit_code == 1


def test_severity_comes_from_the_registry():
    for code, (severity, description) in CODES.items():
        assert Finding(code, "m").severity is severity
        assert description and not description.endswith(".")
        assert code == code.lower() and " " not in code
    with pytest.raises(ValueError):
        Finding("no-such-code", "m")


def test_read_error_mid_check_is_exit_1(base_image, monkeypatch):
    with Image.open(base_image) as img:

        def broken(offset, length):
            raise ImageIOError(f"offset {offset:#x}: read failed: Input/output error")

        monkeypatch.setattr(img, "pread", broken)
        report = check_image(img, held_locks=())
    assert report.exit_code == 1
    assert [f.code for f in report.findings if f.severity is Severity.FAILED] == [
        "image-read-error"
    ]


def test_check_path_library(base_image):
    report = check_path(base_image)
    assert report.exit_code == 0
    assert [b.status for b in report.bitmaps] == ["consistent", "consistent"]


def test_installed_command_pipes_json(base_image):
    """The real console script: JSON on stdout, nothing on stderr, no colour."""
    proc = subprocess.run(
        [sys.executable, "-m", "qbitmap", "check", "--json", str(base_image)],
        capture_output=True,
        text=True,
        env={**os.environ, "FORCE_COLOR": "1"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 0
    assert proc.stderr == ""


def test_check_takes_no_lock(base_image, tmp_path):
    """While check has the image open, a writer can still open it."""
    qemu.require_tools("qemu-img")
    with Image.open(base_image):
        assert qemu.lock_bytes_held(base_image) == set()


def test_every_exit_status_has_a_verdict_line():
    """The human report names its verdict for every status check gives, 75 included."""
    from rich.console import Console

    from qbitmap.render.check import human

    for code in (0, 1, 2, 3, 4, 75):

        class Verdict(CheckReport):
            exit_code = code  # type: ignore[assignment]

        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(human(Verdict("x.qcow2")))
        last = out.getvalue().splitlines()[-1]
        assert last.startswith("Result: ") and last.endswith(f"(exit {code})"), last
        assert "?" not in last
