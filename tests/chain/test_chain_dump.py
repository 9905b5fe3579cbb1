"""dump --backing-chain: every layer, and each name's dirty ranges united over the chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import qemu
from chain_helpers import MiB, make_chain, set_backing_name
from click.testing import CliRunner

from qbitmap.cli import cli
from qbitmap.inspect_chain import union_extents


def run_dump(*args: str | Path):
    return CliRunner().invoke(cli, ["dump", *map(str, args)], catch_exceptions=False)


@pytest.fixture
def written(tmp_path: Path) -> list[Path]:
    """top <- mid1 <- base with 'cp1' in every layer, each layer written after its bitmap.

    Each layer's writes are recorded in its own cp1 (the chain a disk-only
    snapshot leaves: base's writes, then mid's, then top's).
    """
    top, mid, base = make_chain(tmp_path)
    plan = {
        base: [(0, MiB), (10 * MiB, 64 * 1024)],
        mid: [(512 * 1024, MiB), (20 * MiB, 4096)],
        top: [(63 * MiB, MiB), (10 * MiB + 32 * 1024, 96 * 1024)],
    }
    for image, writes in plan.items():
        qemu.add_bitmap(image, "cp1")
        qemu.qemu_io_write(image, writes)
    qemu.add_bitmap(base, "only-base")
    qemu.qemu_io_write(base, [(30 * MiB, MiB)])
    return [top, mid, base]


def test_union_equals_what_qemu_exports_layer_by_layer(written):
    top = written[0]
    result = run_dump("--backing-chain", "--json", "--extents", "-b", "cp1", top)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (cp1,) = report["chain_bitmaps"]
    got = [(e["start"], e["length"]) for e in cp1["extents"]]
    per_layer = [r for image in written for r in qemu.nbd_dirty_extents(image, "cp1")]
    assert got == qemu.merge_extents(per_layer)
    assert cp1["present_in"] == [0, 1, 2]
    assert cp1["dirty_bytes"] == sum(n for _, n in got)


def test_json_lists_every_layer_with_its_dump(written):
    top, mid, base = written
    result = run_dump("--backing-chain", "--json", top)
    report = json.loads(result.stdout)
    assert report["filename"] == str(top)
    chain = report["backing_chain"]
    assert [x["filename"] for x in chain] == [str(top), str(mid), str(base)]
    assert [x["index"] for x in chain] == [0, 1, 2]
    assert chain[0]["backing_file"] == "mid1.qcow2" and chain[0]["backing_file_format"] == "qcow2"
    assert chain[2]["backing_file"] is None
    assert [b["name"] for b in chain[2]["dump"]["bitmaps"]] == ["cp1", "only-base"]
    assert chain[0]["dump"]["virtual_size"] == 64 * MiB
    names = {b["name"]: b["present_in"] for b in report["chain_bitmaps"]}
    assert names == {"cp1": [0, 1, 2], "only-base": [2]}
    assert report["chain_error"] is None
    assert all("extents" not in b for b in report["chain_bitmaps"])


def test_lines_are_the_union(written):
    top = written[0]
    lines = run_dump("--backing-chain", "--lines", "-b", "cp1", top)
    assert lines.exit_code == 0
    pairs = [tuple(map(int, line.split())) for line in lines.stdout.splitlines()]
    per_layer = [r for image in written for r in qemu.nbd_dirty_extents(image, "cp1")]
    assert pairs == qemu.merge_extents(per_layer)
    both = run_dump("--backing-chain", "--lines", top)
    assert {line.split()[2] for line in both.stdout.splitlines()} == {"cp1", "only-base"}


def test_human_view_shows_the_chain_and_the_union(written):
    top = written[0]
    result = run_dump("--backing-chain", "--extents", "-b", "cp1", top)
    assert result.exit_code == 0
    out = result.stdout
    assert "Backing chain" in out and "mid1.qcow2" in out and "base.qcow2" in out
    assert "Dirty extents of 'cp1' over layers 0, 1, 2" in out


def test_raw_bottom_layer_is_shown_as_such(tmp_path):
    top, _mid, _base = make_chain(tmp_path, raw_bottom=True)
    qemu.add_bitmap(top, "cp1")
    result = run_dump("--backing-chain", "--json", top)
    chain = json.loads(result.stdout)["backing_chain"]
    assert chain[2]["format"] == "raw" and chain[2]["dump"] is None
    assert chain[2]["virtual_size"] == 64 * MiB
    human = run_dump("--backing-chain", top)
    assert "no bitmaps (raw)" in human.stdout


def test_a_json_backing_name_is_refused_with_one_line_and_exit_1(written):
    top, mid, _base = written
    set_backing_name(mid, b'json:{"file.driver":"file","file.filename":"base.qcow2"}')
    result = run_dump("--backing-chain", "--json", top)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [x["index"] for x in report["backing_chain"]] == [0, 1]
    assert report["chain_error"]["kind"] == "protocol"
    errors = [line for line in result.stderr.splitlines() if line.startswith("qbitmap: error:")]
    assert len(errors) == 1 and "json: names are not followed" in errors[0]


def test_an_unknown_name_is_a_usage_error(written):
    result = run_dump("--backing-chain", "-b", "nope", written[0])
    assert result.exit_code == 64
    assert "no bitmap named 'nope' in any layer" in result.stderr


def test_in_use_layers_are_warned_about(written):
    top, mid, _base = written
    qemu.crash_image(mid, [], bitmaps=("cp1",))
    result = run_dump("--backing-chain", "-b", "cp1", top)
    assert result.exit_code == 0
    assert "layer 1" in result.stderr and "stale" in result.stderr


def test_union_extents_merges_overlaps_and_cuts_at_the_limit():
    a = (np.array([0, 100, 500]), np.array([50, 100, 10]))
    b = (np.array([40, 150, 300]), np.array([20, 10, 300]))
    starts, lengths = union_extents([a, b], limit=550)
    assert list(zip(starts.tolist(), lengths.tolist(), strict=True)) == [
        (0, 60),
        (100, 100),
        (300, 250),
    ]
    empty = union_extents([], limit=10)
    assert len(empty[0]) == 0
