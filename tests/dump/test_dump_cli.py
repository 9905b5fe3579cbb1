"""``qbitmap dump`` as a command: output forms, names from the image, exit codes, errors.

Images are made by qemu-img/qemu-io; damaged ones are cut or edited copies.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
import qemu
from click.testing import CliRunner
from dumprun import dump, dump_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbitmap.cli import cli
from qbitmap.format.model import HEADER_FIELDS

MiB = 1 << 20
NASTY = ["[bold]x[/bold]", "[/nope]", "tab\there", "new\nline", "sp ace", "100%"]
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB; bitmaps a (64 KiB), b (1 MiB, disabled later), and the names in NASTY."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("dump-cli") / "sample.qcow2"
    qemu.create_image(path, 1 << 30)
    qemu.add_bitmap(path, "a")
    qemu.add_bitmap(path, "b", granularity=MiB)
    qemu.qemu_io_write(path, [(0, 4096), (5 * MiB, 200 * 1024)])
    qemu.bitmap_op(path, "b", "--disable")
    for name in NASTY:
        qemu.add_bitmap(path, name)
    qemu.qemu_io_write(path, [(700 * MiB, 65536), (1024 * MiB - 512, 512)])
    path.chmod(0o444)
    return path


A_EXTENTS = [(0, 65536), (5 * MiB, 256 * 1024), (700 * MiB, 65536), (1024 * MiB - 65536, 65536)]


def test_json_is_one_object_with_every_field(sample: Path) -> None:
    result = dump("--json", sample)
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    report = result.json
    assert report["filename"] == str(sample)
    assert report["virtual_size"] == 1 << 30
    assert report["cluster_size"] == 65536
    assert report["version"] == 3
    assert list(report["header"]) == list(HEADER_FIELDS)
    assert report["header"]["magic"] == "514649fb"
    assert report["header"]["size"] == 1 << 30
    assert report["features"]["autoclear"] == ["bitmaps"]
    names = [e["name"] for e in report["extensions"]]
    assert names == ["feature name table", "bitmaps"]
    assert report["extensions"][1]["nb_bitmaps"] == 2 + len(NASTY)
    assert [b["name"] for b in report["bitmaps"]] == ["a", "b", *NASTY]
    for bitmap in report["bitmaps"]:
        assert {
            "name",
            "granularity",
            "flags",
            "type",
            "table_offset",
            "table_size",
            "dirty_bytes",
        } <= set(bitmap)
        assert "extents" not in bitmap
    a, b = report["bitmaps"][:2]
    assert a["flags"] == ["auto"] and b["flags"] == []
    assert a["dirty_bytes"] == sum(n for _, n in A_EXTENTS)
    assert b["granularity"] == MiB and b["dirty_bytes"] == 2 * MiB
    info = qemu.img_bitmaps(sample)
    assert {x["name"]: x["flags"] for x in report["bitmaps"]} == {
        n: v["flags"] for n, v in info.items()
    }


def test_json_extents_and_bitmap_selection(sample: Path) -> None:
    result = dump("--json", "--extents", "-b", "b", "--bitmap", "a", sample)
    assert result.exit_code == 0
    # Directory order, whatever the order of -b.
    assert [b["name"] for b in result.json["bitmaps"]] == ["a", "b"]
    assert result.extents("a") == A_EXTENTS
    assert result.extents("b") == [(0, MiB), (5 * MiB, MiB)]
    assert all(set(e) == {"start", "length"} for e in result.json["bitmaps"][0]["extents"])


def test_lines(sample: Path) -> None:
    result = dump("--lines", "-b", "a", sample)
    assert result.exit_code == 0
    assert result.stdout == "".join(f"{s} {n}\n" for s, n in A_EXTENTS)
    several = dump("--lines", "-b", "a", "-b", "sp ace", "-b", "new\nline", sample)
    rows = [line.split(" ") for line in several.stdout.splitlines()]
    assert all(len(row) == 3 for row in rows)
    assert {row[2] for row in rows} == {"a", "sp\\x20ace", "new\\nline"}


def test_names_from_the_image_are_never_markup(sample: Path) -> None:
    plain = dump_process("--extents", sample, env={"COLUMNS": "200"})
    assert plain.exit_code == 0, plain.stderr
    runner = CliRunner()
    colored = runner.invoke(
        cli,
        ["--color", "dump", "--extents", str(sample)],
        catch_exceptions=False,
        env={"COLUMNS": "200"},
    )
    assert colored.exit_code == 0, colored.stderr
    assert ANSI.search(colored.stdout), "--color must colour"
    for text in (plain.stdout, re.sub(r"\x1b\[[0-9;]*m", "", colored.stdout)):
        assert "[bold]x[/bold]" in text and "[/nope]" in text and "100%" in text
        assert "Dirty extents of '[bold]x[/bold]'" in text
        assert "Dirty extents of '[/nope]'" in text


def test_pipe_output_has_no_colour(sample: Path) -> None:
    for args in (["--extents"], ["--json", "--extents"], ["--lines"]):
        result = dump_process(*args, sample)
        assert result.exit_code == 0
        assert not ANSI.search(result.stdout) and not ANSI.search(result.stderr)
    with_color = dump_process("--extents", sample, env={"FORCE_COLOR": "1"})
    assert with_color.exit_code == 0


def test_unknown_bitmap_name_is_a_usage_error(sample: Path) -> None:
    result = dump("-b", "a", "-b", "zz", sample)
    assert result.exit_code == 64
    assert result.stdout == ""
    assert result.stderr == f"qbitmap: error: {sample}: no bitmap named 'zz'\n"


@pytest.mark.parametrize(
    "args",
    [["--json", "--lines"], ["--nope"], [], ["-b"]],
)
def test_usage_errors_exit_64_in_one_line(sample: Path, args: list[str]) -> None:
    result = dump_process(*args, *([sample] if args and args != ["-b"] else []))
    assert result.exit_code == 64
    assert result.stderr.startswith("qbitmap: error: ") and result.stderr.count("\n") == 1


def test_missing_file_directory_empty_and_garbage(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    rng = random.Random(5)
    (tmp_path / "garbage").write_bytes(bytes(rng.randrange(256) for _ in range(100_000)))
    (tmp_path / "qcow1").write_bytes(b"QFI\xfb\x00\x00\x00\x01" + bytes(100))
    (tmp_path / "short").write_bytes(b"QFI")
    cases = {
        tmp_path / "missing": "cannot open: No such file or directory",
        tmp_path: "is a directory",
        tmp_path / "empty": "offset 0x0 (magic): not a qcow2 image",
        tmp_path / "garbage": "offset 0x0 (magic): not a qcow2 image",
        tmp_path / "short": "offset 0x0 (magic): not a qcow2 image",
        tmp_path / "qcow1": "offset 0x4 (version): unsupported qcow2 version 1",
    }
    for path, message in cases.items():
        result = dump_process(path)
        assert result.exit_code == 1, path
        assert result.stdout == ""
        assert result.stderr.startswith("qbitmap: error: ") and result.stderr.count("\n") == 1
        assert message in result.stderr, result.stderr


def required_length(path: Path) -> int:
    """Bytes of *path* that dump must read: cluster 0's extensions, the directory, tables, data."""
    raw = path.read_bytes()
    exts = qemu.header_extensions(path)
    last_offset, _, last_data = exts[-1]
    need = last_offset + 8 + (len(last_data) + 7 & ~7) + 8  # + the end marker
    bm = next(d for _, m, d in exts if m == 0x23852875)
    _, _, dir_size, dir_offset = struct.unpack(">IIQQ", bm[:24])
    need = max(need, dir_offset + dir_size)
    for entry in qemu.bitmap_directory(path):
        table = entry["table_offset"]
        need = max(need, table + 8 * entry["table_size"])
        for i in range(entry["table_size"]):
            data = struct.unpack_from(">Q", raw, table + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            if data:
                need = max(need, data + 65536)
    return need


def test_truncated_at_many_lengths(sample: Path, tmp_path: Path) -> None:
    raw = sample.read_bytes()
    need = required_length(sample)
    assert need <= len(raw)
    marks = {0, 4, 7, 8, 71, 72, 103, 104, 111, 112, 500, 4096, 65535, 65536, need - 1, need}
    for e in qemu.bitmap_directory(sample):
        for base in (e["entry_offset"], e["table_offset"]):
            marks |= {base - 1, base, base + 1, base + 7, base + 8}
    lengths = sorted(
        m for m in marks | set(random.Random(1).sample(range(need), 120)) if m <= len(raw)
    )
    path = tmp_path / "cut.qcow2"
    for length in lengths:
        path.write_bytes(raw[:length])
        result = dump("--json", "--extents", path)
        if length >= need:
            assert result.exit_code == 0, (length, result.stderr)
            assert result.extents("a") == A_EXTENTS
        else:
            assert result.exit_code == 1, (length, need)
            assert result.stdout == ""
            assert re.fullmatch(
                rf"qbitmap: error: {re.escape(str(path))}: offset 0x[0-9a-f]+ \([^)]+\): [^\n]+\n",
                result.stderr,
            ), (length, result.stderr)


@settings(
    max_examples=int(os.environ.get("QBITMAP_FUZZ_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_damaged_bytes_never_crash(sample: Path, tmp_path: Path, data: st.DataObject) -> None:
    raw = bytearray(sample.read_bytes())
    directory = qemu.bitmap_directory(sample)
    hot = (
        [(0, 1024)]
        + [(e["entry_offset"], 40) for e in directory]
        + [(e["table_offset"], 8 * e["table_size"]) for e in directory]
    )
    for _ in range(data.draw(st.integers(1, 6))):
        start, size = data.draw(st.sampled_from(hot))
        pos = data.draw(st.integers(start, min(start + size, len(raw)) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "damaged.qcow2"
    path.write_bytes(bytes(raw))
    result = dump("--json", "--extents", path)
    assert result.exit_code in (0, 1, 64)
    if result.exit_code:
        assert result.stderr.startswith("qbitmap: error: ") and result.stderr.count("\n") == 1
        assert "internal error" not in result.stderr
    else:
        json.loads(result.stdout)


def test_reads_an_image_a_running_qemu_holds(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon", "qemu-nbd", "nbdinfo")
    path = qemu.create_image(tmp_path / "live.qcow2", 256 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 65536)])
    with qemu.StorageDaemon(path, writable=True) as daemon:
        daemon.writes([(10 * MiB, 4096)], flush=True)
        held = qemu.lock_bytes_held(path)
        assert {101, 201} <= held, held  # QEMU holds write and refuses to share it
        result = dump_process("--json", "--extents", path)
        assert result.exit_code == 0, result.stderr
        (bitmap,) = result.json["bitmaps"]
        # QEMU marked the bitmap in use when it opened the image read-write.
        assert bitmap["flags"] == ["in-use", "auto"]
        assert result.extents("b0") == [(0, 65536)]
        assert "stale" in result.stderr
        assert "held by a running writer" in result.stderr
        assert "did not close it cleanly" not in result.stderr
        assert qemu.lock_bytes_held(path) == held and daemon.running
        daemon.stop()
    after = dump("--json", "--extents", path)
    assert after.json["bitmaps"][0]["flags"] == ["auto"]
    assert (
        after.extents("b0") == [(0, 65536), (10 * MiB, 65536)] == qemu.nbd_dirty_extents(path, "b0")
    )


def test_a_running_writer_is_not_a_crash(tmp_path: Path) -> None:
    """In use because a writer runs (its lock bytes held) is said apart from a writer that died."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = qemu.create_image(tmp_path / "live.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1")
    live = "held by a running writer"
    crashed = "did not close it cleanly"
    with qemu.StorageDaemon(path, writable=True) as daemon:
        for args in (["--json"], ["--lines"], ["--extents"], []):
            result = dump_process(*args, path, env={"COLUMNS": "300"})
            assert result.exit_code == 0, result.stderr
            warnings = result.stderr.splitlines()
            assert len(warnings) == 2 and all(live in line for line in warnings), warnings
            assert crashed not in result.stderr + result.stdout
            if not args or args == ["--extents"]:
                assert result.stdout.count(live) == 2
        daemon.kill()
    for args in (["--json"], []):
        result = dump_process(*args, path, env={"COLUMNS": "300"})
        assert result.stderr.count(crashed) == 2 and live not in result.stderr + result.stdout


def test_autoclear_bit_clear_marks_every_bitmap_stale(sample: Path, tmp_path: Path) -> None:
    path = tmp_path / "autoclear.qcow2"
    shutil.copyfile(sample, path)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 0))
    result = dump("--json", path)
    assert result.exit_code == 0
    assert all(b["stale"] and not b["in_use"] for b in result.json["bitmaps"])
    assert "autoclear bit 0" in result.stderr


def test_feature_names_come_from_the_image_table(sample: Path, tmp_path: Path) -> None:
    path = tmp_path / "names.qcow2"
    shutil.copyfile(sample, path)
    path.chmod(0o644)
    (table,) = [(o, d) for o, m, d in qemu.header_extensions(path) if m == 0x6803F857]
    offset, data = table
    entries = [data[i : i + 48] for i in range(0, len(data), 48)]
    index = next(i for i, e in enumerate(entries) if e[:2] == b"\x02\x00")  # autoclear bit 0
    with open(path, "r+b") as f:
        f.seek(offset + 8 + 48 * index + 2)
        f.write(b"persistent dirty bitmaps".ljust(46, b"\0"))
        f.seek(88)  # autoclear_features: also set bit 5, which no table names
        f.write(struct.pack(">Q", 1 | 1 << 5))
    result = dump("--json", path)
    assert result.exit_code == 0
    assert result.json["features"]["autoclear"] == ["persistent dirty bitmaps", "unknown bit 5"]
    human = dump(path)
    assert "0x21: persistent dirty bitmaps, unknown bit 5" in human.stdout


def test_human_extents_are_aligned_rows(sample: Path) -> None:
    result = dump("--extents", "-b", "a", "-b", "[/nope]", sample)
    assert result.exit_code == 0
    text = result.stdout
    assert "Dirty extents of 'a' (4 ranges)" in text
    assert "Dirty extents of '[/nope]' (2 ranges)" in text
    block = text.split("Dirty extents of 'a' (4 ranges)\n", 1)[1].split("\n\n", 1)[0]
    header, rule, *rows = block.splitlines()
    assert header.split() == ["start", "length", "end", "size"] and set(rule.strip()) == {"-"}
    assert len({len(line) for line in [header, rule, *rows]}) == 1  # aligned
    parsed = [(int(r.split()[0]), int(r.split()[1]), int(r.split()[2])) for r in rows]
    assert parsed == [(s, n, s + n) for s, n in A_EXTENTS]
    assert rows[1].endswith("256 KiB")


def test_block_device(sample: Path, tmp_path: Path) -> None:
    """An image on a block device (LVM, a loop device here) is read like a file."""
    import subprocess

    qemu.require_tools("losetup")
    qemu.require(os.geteuid() == 0, "attaching a loop device needs root")
    backing = tmp_path / "loop.img"
    shutil.copyfile(sample, backing)
    backing.chmod(0o644)
    os.truncate(backing, -(-backing.stat().st_size // MiB) * MiB)  # whole sectors
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    qemu.require(attach.returncode == 0, f"cannot attach a loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        on_device = dump("--json", "--extents", device)
        in_file = dump("--json", "--extents", backing)
        assert on_device.exit_code == 0, on_device.stderr
        assert on_device.json["bitmaps"] == in_file.json["bitmaps"]
        assert on_device.extents("a") == A_EXTENTS
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
