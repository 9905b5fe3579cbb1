"""libvirt's rule over a backing chain (check --backing-chain), on chains QEMU's tools made."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import qemu
from chain_helpers import make_chain, set_backing_name
from click.testing import CliRunner

from qbitmap.check.chain import check_chain_path, worst_exit_code
from qbitmap.cli import cli


def verdict(top: Path, name: str):
    report = check_chain_path(str(top))
    (v,) = [v for v in report.verdicts if v.name == name]
    return report, v


def run_check(*args: str | Path):
    result = CliRunner().invoke(cli, ["check", *map(str, args)], catch_exceptions=False)
    return result


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """top <- mid1 <- base, all qcow2, no bitmaps yet."""
    return make_chain(tmp_path)


def test_consecutive_from_the_top_is_ok(chain):
    top, mid, _base = chain
    for image in (top, mid):
        qemu.add_bitmap(image, "cp1")
    qemu.add_bitmap(top, "cp2")
    report, v = verdict(top, "cp1")
    assert (v.verdict, v.present_in, v.problems) == ("ok", (0, 1), ())
    assert verdict(top, "cp2")[1].verdict == "ok"
    assert report.exit_code == 0


def test_absent_from_the_top_image_is_missing(chain):
    top, mid, base = chain
    qemu.add_bitmap(mid, "cp1", granularity=1 << 20)
    qemu.add_bitmap(base, "cp1")
    _, v = verdict(top, "cp1")
    assert v.verdict == "missing" and v.repairable
    assert [(p.kind, p.index) for p in v.problems] == [("missing", 0)]
    # A bitmap made in the top image should match the nearest layer's (mid's 1 MiB).
    assert v.problems[0].granularity == 1 << 20


@pytest.mark.parametrize(
    ("cluster_size", "expected"), [(512, 4096), (65536, 65536), (1 << 21, 65536)]
)
def test_a_missing_bitmap_nowhere_gets_qemus_default_granularity(tmp_path, cluster_size, expected):
    top = qemu.create_image(tmp_path / "top.qcow2", 64 << 20, cluster_size=cluster_size)
    qemu.add_bitmap(top, "other")
    report = check_chain_path(str(top))
    from qbitmap.check.chain import judge_bitmap

    v = judge_bitmap("cp1", report.views)
    assert v.verdict == "missing" and v.problems[0].granularity == expected
    # ... which is what QEMU itself picks for a bitmap added without a granularity:
    qemu.add_bitmap(top, "probe")
    assert qemu.img_bitmaps(top)["probe"]["granularity"] == expected


def test_absent_between_two_layers_is_a_gap(chain):
    top, _mid, base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.add_bitmap(base, "cp1")
    report, v = verdict(top, "cp1")
    assert v.verdict == "gap" and v.present_in == (0, 2)
    assert [(p.kind, p.index) for p in v.problems] == [("gap", 1)]
    # Each layer on its own is healthy: check's status is the layers', the rule is reported.
    assert report.exit_code == 0


def test_missing_from_top_and_middle_lists_both_layers(chain):
    top, _mid, base = chain
    qemu.add_bitmap(base, "cp1")
    _, v = verdict(top, "cp1")
    assert [(p.kind, p.index) for p in v.problems] == [("missing", 0), ("gap", 1)]


def test_in_use_in_a_lower_layer(chain):
    top, mid, _base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.crash_image(mid, [(0, 65536)], bitmaps=("cp1",))
    report, v = verdict(top, "cp1")
    assert v.verdict == "in-use" and v.repairable
    assert [(p.kind, p.index) for p in v.problems] == [("in-use", 1)]
    assert report.exit_code == 4


def test_disabled_is_not_recording(chain):
    top, _mid, _base = chain
    qemu.add_bitmap(top, "cp1", disabled=True)
    _, v = verdict(top, "cp1")
    assert v.verdict == "not-recording"
    assert v.layers[0].recording is False


def test_in_use_and_disabled_in_one_layer_are_two_problems(chain):
    top, _mid, _base = chain
    qemu.add_bitmap(top, "cp1", disabled=True)
    qemu.crash_image(top, [], bitmaps=("cp1",))
    _, v = verdict(top, "cp1")
    assert v.verdict == "in-use"
    assert [p.kind for p in v.problems] == ["in-use", "not-recording"]


def test_a_corrupt_bitmap_in_the_base(chain):
    top, mid, base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.add_bitmap(mid, "cp1")
    qemu.add_bitmap(base, "cp1")
    qemu.qemu_io(base, "write 0 64k")
    (entry,) = qemu.bitmap_directory(base)
    with open(base, "r+b") as f:  # an unaligned data cluster offset in the bitmap table
        f.seek(entry["table_offset"])
        f.write(struct.pack(">Q", 0x12345600))
    report, v = verdict(top, "cp1")
    assert v.verdict == "corrupt" and not v.repairable
    assert report.exit_code == 2


def test_an_ignored_bitmaps_extension_hides_the_layer_bitmaps(chain):
    top, mid, _base = chain
    for image in chain:
        qemu.add_bitmap(image, "cp1")
    autoclear = qemu.read_autoclear(mid)
    with open(mid, "r+b") as f:  # autoclear bit 0 cleared: QEMU ignores every bitmap of mid
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))
    report, v = verdict(top, "cp1")
    assert v.verdict == "gap" and not v.repairable
    assert "ignores" in v.problems[0].detail
    assert report.views[1].bitmaps_ignored


def test_a_raw_bottom_layer_ends_the_chain(tmp_path):
    top, _mid, _base = make_chain(tmp_path, raw_bottom=True)
    qemu.add_bitmap(top, "cp1")
    report, v = verdict(top, "cp1")
    assert v.verdict == "ok"
    assert [x.layer.format for x in report.views] == ["qcow2", "qcow2", "raw"]
    assert report.views[2].report is None


def test_a_chain_that_cannot_be_followed_is_unreadable_and_exit_1(chain):
    top, mid, _base = chain
    qemu.add_bitmap(top, "cp1")
    set_backing_name(mid, b'json:{"file.filename": "base.qcow2"}')
    report, v = verdict(top, "cp1")
    assert v.verdict == "unreadable"
    assert report.exit_code == 1


def test_exit_status_is_the_worst_layer_by_checks_precedence(chain):
    top, mid, base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.crash_image(base, [], bitmaps=("b",))  # base: exit 4
    assert check_chain_path(str(top)).exit_code == 4
    qemu.qemu_io(mid, "write 0 64k")
    qemu.add_bitmap(mid, "m")
    qemu.qemu_io(mid, "write 0 64k")
    (entry,) = qemu.bitmap_directory(mid)
    with open(mid, "r+b") as f:
        f.seek(entry["table_offset"])
        f.write(struct.pack(">Q", 0x12345600))
    assert check_chain_path(str(top)).exit_code == 2  # 2 wins over 4
    assert worst_exit_code([0, 3, 4, 75, 2]) == 75
    assert worst_exit_code([3, 0]) == 3
    assert worst_exit_code([2, 1]) == 1
    assert worst_exit_code([]) == 0


def test_cli_json_is_one_object_with_every_layer_and_the_rule(chain):
    top, _mid, base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.add_bitmap(base, "cp1")
    qemu.add_bitmap(top, "cp2")
    result = run_check("--backing-chain", "--json", top)
    report = __import__("json").loads(result.stdout)
    assert result.exit_code == report["exit_code"] == 0
    assert [x["filename"] for x in report["backing_chain"]] == [str(p) for p in chain]
    assert [x["check"]["exit_code"] for x in report["backing_chain"]] == [0, 0, 0]
    by_name = {b["name"]: b for b in report["chain_bitmaps"]}
    assert by_name["cp1"]["verdict"] == "gap" and by_name["cp1"]["present_in"] == [0, 2]
    assert by_name["cp1"]["problems"][0]["kind"] == "gap"
    assert by_name["cp2"]["verdict"] == "ok"
    assert report["chain_error"] is None


def test_cli_bitmap_selection(chain):
    top, _mid, base = chain
    qemu.add_bitmap(top, "cp1")
    qemu.add_bitmap(base, "other")
    result = run_check("--backing-chain", "--json", "-b", "other", top)
    report = __import__("json").loads(result.stdout)
    assert [b["name"] for b in report["chain_bitmaps"]] == ["other"]
    assert report["backing_chain"][0]["check"]["bitmaps"] == []
    assert [b["name"] for b in report["backing_chain"][2]["check"]["bitmaps"]] == ["other"]
    bad = run_check("--backing-chain", "-b", "nope", top)
    assert bad.exit_code == 64 and "no bitmap named 'nope' in any layer" in bad.stderr


def test_cli_human_view_escapes_names_and_says_the_verdict(chain):
    top, _mid, base = chain
    qemu.add_bitmap(base, "evil\x1b]0;title\x07")
    result = run_check("--backing-chain", top)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout
    assert "missing" in result.stdout and "\\x1b]0;title\\x07" in result.stdout


def test_cli_unreadable_top_image(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 65536)
    result = run_check("--backing-chain", "--json", raw)
    report = __import__("json").loads(result.stdout)
    assert result.exit_code == 1 == report["exit_code"]
    assert report["backing_chain"][0]["check"]["findings"][0]["code"] == "image-unreadable"
