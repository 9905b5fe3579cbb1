"""``--output=json`` (qemu-img's spelling) is ``--json`` on every command that has ``--json``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import qemu
from libvirt_files import Disk, Host

from qbitmap.cli import cli

MiB = 1 << 20


def qbitmap(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbitmap", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "100"},
    )


def test_every_command_with_json_has_output() -> None:
    with_json = []
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert command is not None, name
        options = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
        if "--json" in options:
            with_json.append(name)
            (output,) = [p for p in command.params if "--output" in p.opts]
            assert isinstance(output.type, click.Choice)
            assert list(output.type.choices) == ["human", "json"], name
    assert sorted(with_json) == ["check", "checkpoints", "dump", "recover"]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    path = qemu.create_image(tmp_path_factory.mktemp("output") / "crashed.qcow2", 64 * MiB)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 65536)])
    qemu.crash_image(path, [(MiB, 4096)], bitmaps=("b0",))
    path.chmod(0o444)
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["dump", "--extents"],
        ["check"],
        ["recover", "--mode", "full", "--dry-run"],
    ],
    ids=["dump", "check", "recover"],
)
def test_output_json_is_json(crashed: Path, tmp_path: Path, args: list[str]) -> None:
    image = tmp_path / "x.qcow2"
    shutil.copyfile(crashed, image)
    spelled = {
        "--json": qbitmap(*args, "--json", image),
        "--output=json": qbitmap(*args, "--output=json", image),
        "--output json": qbitmap(*args, "--output", "json", image),
    }
    documents = {k: json.loads(p.stdout) for k, p in spelled.items()}
    for proc in spelled.values():
        assert proc.returncode == spelled["--json"].returncode
    first = documents["--json"]
    for document in documents.values():
        assert set(document) == set(first)
        assert document.get("bitmaps") is not None
    human = qbitmap(*args, "--output=human", image)
    default = qbitmap(*args, image)
    assert human.stdout == default.stdout and human.returncode == default.returncode
    assert not human.stdout.startswith("{")


def test_checkpoints_output_json(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img")
    host = Host(tmp_path)
    vda = qemu.create_image(host.images / "vda.qcow2", 16 * MiB)
    host.define("vm", [Disk("vda", str(vda))])
    host.checkpoint("vm", "cp1")
    qemu.add_bitmap(vda, "cp1")
    a = qbitmap("checkpoints", *host.args(), "--json", "vm")
    b = qbitmap("checkpoints", *host.args(), "--output=json", "vm")
    assert a.returncode == b.returncode == 0
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_contradictions_are_usage_errors(crashed: Path) -> None:
    for args, needle in (
        (["dump", "--output=json", "--lines"], "--json and --lines"),
        (["dump", "--output=human", "--json"], "--output=human and --json"),
        (["check", "--output=xml"], "--output"),
        (["recover", "--output=human", "--json", "--mode", "full"], "--output=human"),
    ):
        proc = qbitmap(*args, crashed)
        assert proc.returncode == 64, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_check_output_json_answers_a_usage_error_in_json(crashed: Path) -> None:
    """As with --json: one JSON object for every exit status, usage errors included."""
    for spelling in (["--output=json"], ["--output", "json"]):
        proc = qbitmap("check", *spelling, "--frob", crashed)
        assert proc.returncode == 64
        document = json.loads(proc.stdout)
        assert document["exit_code"] == 64 and "--frob" in document["error"]
    proc = qbitmap("check", "--output=json", "-b", "nope", crashed)
    assert proc.returncode == 64 and json.loads(proc.stdout)["filename"] == str(crashed)
