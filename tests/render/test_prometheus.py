"""``check --prometheus`` and ``checkpoints --prometheus``: metrics a real Prometheus parser reads.

Every output is parsed with prometheus-client's text-format parser (the
format node_exporter's textfile collector reads); names from images, file
names and libvirt's files are hostile: quotes, backslashes, newlines,
escape sequences, bytes that are not UTF-8.  Images are made by QEMU (one
crashed by SIGKILL); names QEMU's tools refuse are written with struct.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import corrupt
import pytest
import qemu
from libvirt_files import Disk, Host
from prometheus_client.parser import text_string_to_metric_families

from qbitmap.render.prometheus import escape_label_value

MiB = 1 << 20
QUOTE, BACKSLASH, NEWLINE = 'say "hi"', "back\\slash", "two\nlines"
TITLE = "t\x1b]0;pwned\x07"
RAW_BYTES = b"raw\xff\xfe"
CHECK_FAMILIES = [
    "qbitmap_check_exit_code",
    "qbitmap_check_timestamp_seconds",
    "qbitmap_check_findings",
    "qbitmap_check_bitmaps",
    "qbitmap_bitmap_status",
    "qbitmap_bitmap_dirty_bytes",
    "qbitmap_bitmap_recording",
    "qbitmap_bitmap_granularity_bytes",
]


def qbitmap(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(os.fsencode, map(str, args))],
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def parse(output: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Family name -> samples, by the real parser; also checks the file is one a collector takes."""
    text = output.decode("utf-8")  # the format is UTF-8: this must not fail
    assert text.endswith("\n")
    families: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        assert family.documentation, family.name
        assert family.name not in families, f"{family.name} is split"
        families[family.name] = [(s.labels, s.value) for s in family.samples]
    for name, samples in families.items():
        keys = Counter(tuple(sorted(labels.items())) for labels, _ in samples)
        assert all(n == 1 for n in keys.values()), f"{name} repeats a series"
        assert all(s.name == name for s in _samples(text, name)), name
    assert "# HELP" in text and "# TYPE" in text
    return families


def _samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) if f.name == name for s in f.samples]


def by(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    (value,) = [v for ls, v in samples if all(ls.get(k) == x for k, x in labels.items())]
    return value


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A crashed image whose bitmap names hold quotes, backslashes, a newline, escapes, raw bytes.

    Its own file name holds a quote, a backslash, a newline and a byte that is not UTF-8.
    """
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    root = tmp_path_factory.mktemp("prom")
    path = root / "plain.qcow2"
    qemu.create_image(path, 64 * MiB)
    names = [QUOTE, BACKSLASH, NEWLINE, TITLE, "raw"]
    for name in names:
        qemu.add_bitmap(path, name)
    qemu.qemu_io_write(path, [(0, 65536), (5 * MiB, 65536)])
    qemu.crash_image(path, [(9 * MiB, 4096)], bitmaps=names)
    lay = corrupt.layout(path)
    corrupt.rewrite_directory(
        lay, [(e, b"", RAW_BYTES if e.name == b"raw" else e.name) for e in lay.entries]
    )
    hostile_path = Path(os.fsdecode(bytes(root) + b'/vm "a"\\b\nc\xff.qcow2'))
    path.rename(hostile_path)
    hostile_path.chmod(0o444)
    return hostile_path


def test_check_metrics_of_a_fleet_parse_with_their_values(
    hostile: Path, base_image: Path, tmp_path: Path
) -> None:
    clean = tmp_path / "clean.qcow2"
    shutil.copyfile(base_image, clean)
    leaky = corrupt.apply(base_image, tmp_path / "leaky.qcow2", "data-refcount-2")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = qbitmap("check", "--prometheus", clean, hostile, leaky, fifo, clean)
    assert proc.returncode == 1, proc.stderr
    # Only the image that could not be checked has a line on stderr.
    assert proc.stderr.decode().splitlines() == [
        f"qbitmap: error: {fifo}: is a FIFO; an image is a regular file or a block device"
    ]
    families = parse(proc.stdout)
    assert list(families) == CHECK_FAMILIES
    shown = escape_label_value(str(hostile))
    image = shown.replace('\\"', '"').replace("\\\\", "\\")  # the value the parser returns
    assert image == str(hostile).encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace"
    ).replace("\n", "\\n")
    exit_codes = {ls["image"]: v for ls, v in families["qbitmap_check_exit_code"]}
    assert exit_codes == {str(clean): 0, image: 4, str(leaky): 3, str(fifo): 1}
    assert by(families["qbitmap_check_findings"], image=image, severity="in-use") == 5
    assert by(families["qbitmap_check_findings"], image=str(leaky), severity="leak") >= 1
    assert by(families["qbitmap_check_findings"], image=str(fifo), severity="failed") == 1
    assert by(families["qbitmap_check_bitmaps"], image=image) == 5
    assert by(families["qbitmap_check_bitmaps"], image=str(clean)) == 2
    # The bitmap names, as a parser reads them back: exact where printable, escaped otherwise.
    statuses = [ls for ls, v in families["qbitmap_bitmap_status"] if ls["image"] == image and v]
    assert sorted(ls["bitmap"] for ls in statuses) == sorted(
        [QUOTE, BACKSLASH, "two\\nlines", "t\\x1b]0;pwned\\x07", "raw\\xff\\xfe"]
    )
    assert {ls["status"] for ls in statuses} == {"in-use"}
    for labels, value in families["qbitmap_bitmap_status"]:
        assert value in (0, 1)
    per_bitmap = Counter((ls["image"], ls["bitmap"]) for ls, _ in families["qbitmap_bitmap_status"])
    assert set(per_bitmap.values()) == {4}  # consistent, in-use, corrupt, ignored
    # Dirty bytes on disk: what QEMU stored at the last clean close (two 64 KiB granules).
    assert by(families["qbitmap_bitmap_dirty_bytes"], image=image, bitmap=QUOTE) == 2 * 65536
    assert by(families["qbitmap_bitmap_dirty_bytes"], image=str(clean), bitmap="b1") > 0
    assert by(families["qbitmap_bitmap_recording"], image=image, bitmap=QUOTE) == 1
    assert by(families["qbitmap_bitmap_granularity_bytes"], image=str(clean), bitmap="b1") == 512
    stamps = [v for _, v in families["qbitmap_check_timestamp_seconds"]]
    assert len(stamps) == 4 and all(v > 1.6e9 for v in stamps)


def test_dirty_bytes_are_what_qemu_exports(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    path = qemu.create_image(tmp_path / "d.qcow2", 256 * MiB)
    qemu.add_bitmap(path, "fine", granularity=512)
    qemu.add_bitmap(path, "coarse", granularity=4 * MiB)
    qemu.qemu_io_write(path, [(100, 1), (3 * MiB, 70000), (255 * MiB, MiB)], zero=True)
    families = parse(qbitmap("check", "--prometheus", path).stdout)
    for name in ("fine", "coarse"):
        expected = sum(n for _, n in qemu.nbd_dirty_extents(path, name))
        assert by(families["qbitmap_bitmap_dirty_bytes"], bitmap=name) == expected


def test_two_bitmaps_with_one_name_stay_two_series(base_image: Path, tmp_path: Path) -> None:
    """QEMU reads both as "a" (a corruption check reports); Prometheus refuses a repeated series."""
    image = corrupt.apply(base_image, tmp_path / "dup.qcow2", "name-nul-duplicate")  # a\0x, a\0y
    twice = corrupt.apply(base_image, tmp_path / "twice.qcow2", "name-duplicate")
    proc = qbitmap("check", "--prometheus", image, twice)
    assert proc.returncode == 2
    families = parse(proc.stdout)
    names = sorted(ls["bitmap"] for ls, v in families["qbitmap_bitmap_status"] if v)
    assert len(names) == 4 and len(set(names)) == 4
    assert any(n.endswith("#2") for n in names)


def test_label_values_are_escaped_as_the_format_requires() -> None:
    assert escape_label_value('a"b') == 'a\\"b'
    assert escape_label_value("a\\b") == "a\\\\b"
    assert escape_label_value("a\nb") == "a\\\\nb"  # shown as on a terminal: \n, then escaped
    assert escape_label_value(os.fsdecode(b"x\xff")) == "x\\\\xff"
    assert escape_label_value("vm-1 é") == "vm-1 é"
    line = 'm{a="' + escape_label_value('"\\\n\x1b\u202e') + '"} 1\n'
    ((_, labels, _),) = [
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(line) for s in f.samples
    ]
    assert labels == {"a": '"\\\\n\\x1b\\u202e'}


def test_usage_errors_write_no_metrics(base_image: Path) -> None:
    proc = qbitmap("check", "--prometheus", "--backing-chain", base_image)
    assert proc.returncode == 64 and proc.stdout == b""
    proc = qbitmap("check", "--prometheus", "--frob", base_image)
    assert proc.returncode == 64 and proc.stdout == b""


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoints_metrics_of_a_host(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    host = Host(tmp_path)
    vda = qemu.create_image(host.images / "vda.qcow2", 64 * MiB)
    vdb = qemu.create_image(host.images / "vdb.qcow2", 64 * MiB)
    vm = 'vm"\\x'
    host.define(vm, [Disk("vda", str(vda)), Disk("vdb", str(vdb))])
    both = (("vda", "bitmap"), ("vdb", "bitmap"))
    host.checkpoint(vm, "cp1", disks=both)
    host.checkpoint(vm, "cp\n2", parent="cp1", disks=both)
    for image in (vda, vdb):
        qemu.add_bitmap(image, "cp1")
        qemu.add_bitmap(image, "cp\n2")
    qemu.add_bitmap(vda, "stray")
    qemu.crash_image(vdb, [(0, 4096)], bitmaps=("cp1", "cp\n2"))
    other = qemu.create_image(host.images / "other.qcow2", 64 * MiB)
    host.define("ok", [Disk("vda", str(other))])
    host.checkpoint("ok", "c1")
    qemu.add_bitmap(other, "c1")
    proc = qbitmap("checkpoints", *host.args(), "--all", "--prometheus")
    assert proc.returncode == 4, proc.stderr
    families = parse(proc.stdout)
    assert list(families) == [
        "qbitmap_checkpoints_exit_code",
        "qbitmap_checkpoints_timestamp_seconds",
        "qbitmap_checkpoints_running",
        "qbitmap_checkpoints_checkpoints",
        "qbitmap_checkpoints_orphan_bitmaps",
        "qbitmap_checkpoint_verdict",
    ]
    assert {ls["domain"]: v for ls, v in families["qbitmap_checkpoints_exit_code"]} == {
        vm: 4,
        "ok": 0,
    }
    assert by(families["qbitmap_checkpoints_orphan_bitmaps"], domain=vm) == 1
    assert by(families["qbitmap_checkpoints_checkpoints"], domain=vm) == 2
    assert by(families["qbitmap_checkpoints_running"], domain="ok") == 0
    held = {
        (ls["checkpoint"], ls["disk"]): ls["verdict"]
        for ls, v in families["qbitmap_checkpoint_verdict"]
        if v == 1 and ls["domain"] == vm
    }
    assert held == {
        ("cp1", "vda"): "ok",
        ("cp1", "vdb"): "in-use",
        ("cp\\n2", "vda"): "ok",
        ("cp\\n2", "vdb"): "in-use",
    }
    json_proc = qbitmap("checkpoints", *host.args(), "--all", "--output=json")
    assert json_proc.returncode == 4
    assert qbitmap("checkpoints", *host.args(), "--all", "--prometheus", "--json").returncode == 64
