"""The ``qbitmap`` program: entry points, global behaviour, and man/qbitmap.1 in step with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import qemu
from click.testing import CliRunner

from qbitmap import __version__
from qbitmap.cli import cli
from qbitmap.commands.dump import dump
from qbitmap.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
MAN = REPO / "man" / "qbitmap.1"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


# -- entry points ----------------------------------------------------------------------


def test_python_dash_m_and_the_console_script() -> None:
    proc = run(sys.executable, "-m", "qbitmap", "--version")
    assert proc.returncode == 0 and proc.stdout == f"qbitmap, version {__version__}\n"
    script = shutil.which("qbitmap") or str(Path(sys.executable).with_name("qbitmap"))
    assert Path(script).exists(), "the qbitmap console script is not installed"
    proc = run(script, "--help")
    assert proc.returncode == 0
    assert "dump" in proc.stdout and "Usage: qbitmap" in proc.stdout


def test_sample_image_in_examples_dumps() -> None:
    sample = REPO / "examples" / "sample.qcow2"
    proc = run(sys.executable, "-m", "qbitmap", "dump", "--json", "--extents", str(sample))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [b["name"] for b in report["bitmaps"]] == ["weekly", "daily"]
    manifest = json.loads((REPO / "tests" / "fixtures" / "golden" / "manifest.json").read_text())
    for bitmap in report["bitmaps"]:
        expected = manifest["sample.qcow2"]["bitmaps"][bitmap["name"]]
        assert [[e["start"], e["length"]] for e in bitmap["extents"]] == expected["dirty"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frob"], "No such command 'frob'"),
        (["--frob"], "No such option: --frob"),
        (["dump"], "Missing argument 'IMAGE'"),
        (["dump", "--frob", "x"], "No such option: --frob"),
    ],
)
def test_usage_errors_are_one_line_and_exit_64(argv: list[str], message: str) -> None:
    proc = run(sys.executable, "-m", "qbitmap", *argv)
    assert proc.returncode == ExitCode.USAGE == 64
    assert proc.stdout == ""
    assert proc.stderr.startswith("qbitmap: error: ") and proc.stderr.count("\n") == 1
    assert message.replace("option: ", "option '").rstrip("'") in proc.stderr.replace(
        "option: ", "option '"
    ), proc.stderr


def test_bare_qbitmap_prints_help_and_exits_64() -> None:
    proc = run(sys.executable, "-m", "qbitmap")
    assert proc.returncode == 64
    assert "Usage: qbitmap" in proc.stderr


def test_internal_errors_are_one_line_unless_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu.require_tools("qemu-img")
    path = qemu.create_image(tmp_path / "x.qcow2", 1 << 20)

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr("qbitmap.inspect.dump_report", boom)
    result = CliRunner().invoke(cli, ["dump", str(path)], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.stderr == (
        f"qbitmap: error: {path}: internal error (RuntimeError: synthetic failure); "
        "rerun with --debug for details\n"
    )
    with pytest.raises(RuntimeError, match="synthetic failure"):
        CliRunner().invoke(cli, ["--debug", "dump", str(path)], catch_exceptions=False)


def test_broken_pipe_is_not_an_error(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path / "many.qcow2", 1 << 30)
    qemu.add_bitmap(path, "b0", granularity=512)
    qemu.qemu_io_write(path, [(i * 8192, 512) for i in range(20000)], unsafe=True)
    proc = subprocess.run(
        f"{sys.executable} -m qbitmap dump --lines {path} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout == "0 512\n"
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr


# -- man/qbitmap.1 ---------------------------------------------------------------------


def man_source() -> str:
    return MAN.read_text()


def section(source: str, name: str) -> str:
    """The roff source of section (.SH) or subsection (.SS) *name*."""
    match = re.search(
        rf"^\.S[HS] \"?{re.escape(name)}\"?\n(.*?)(?=^\.S[HS] |\Z)",
        source,
        re.MULTILINE | re.DOTALL,
    )
    assert match, f"man/qbitmap.1 has no section {name!r}"
    return match.group(1)


def roff_options(text: str) -> set[str]:
    """Every option spelled in roff text (``\\-\\-json``, ``\\-b``)."""
    return set(re.findall(r"(?<![\w\\])\\-(?:\\-)?[a-zA-Z][\w\\-]*", text))


def unroff(option: str) -> str:
    return option.replace("\\-", "-")


def click_options(command: click.Command) -> set[str]:
    out: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            out.update(param.opts)
            out.update(param.secondary_opts)
    ctx = click.Context(command, **command.context_settings)
    out.update(command.get_help_option_names(ctx))
    return out


@pytest.mark.parametrize(
    ("command", "man_section"),
    [(cli, "GLOBAL OPTIONS"), (dump, "Options")],
    ids=["global", "dump"],
)
def test_man_page_lists_exactly_the_click_options(command: click.Command, man_section: str) -> None:
    documented = {unroff(o) for o in roff_options(section(man_source(), man_section))}
    # .TP items are option definitions; other mentions (e.g. NO_COLOR) are not options.
    defined = set()
    for item in re.findall(r"^\.TP\n(.*)$", section(man_source(), man_section), re.MULTILINE):
        defined |= {unroff(o) for o in roff_options(item)}
    assert defined == click_options(command)
    assert click_options(command) <= documented


def test_man_page_documents_every_exit_code() -> None:
    text = section(man_source(), "EXIT STATUS")
    listed = {int(n) for n in re.findall(r"^\.TP\n\.B (\d+)$", text, re.MULTILINE)}
    assert listed == {int(code) for code in ExitCode} == {0, 1, 2, 3, 4, 64, 75, 130}


def test_man_page_documents_the_json_keys(tmp_path: Path) -> None:
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path / "j.qcow2", 1 << 30, backing=None)
    qemu.add_bitmap(path, "b0")
    qemu.qemu_io_write(path, [(0, 512)])
    result = CliRunner().invoke(
        cli, ["dump", "--json", "--extents", str(path)], catch_exceptions=False
    )
    report = json.loads(result.stdout)
    text = section(man_source(), "JSON OUTPUT")
    words = set(re.findall(r"\\\(dq(\w+)\\\(dq", text))
    for line in re.findall(r"^\.BR? (.*)$", text, re.MULTILINE):
        words |= set(re.findall(r"[a-z_][a-z0-9_]*", line))
    keys = set(report) | set(report["header"]) | set(report["features"]) | set(report["bitmaps"][0])
    keys |= {k for ext in report["extensions"] for k in ext}
    keys |= set(report["bitmaps"][0]["extents"][0])
    keys -= {"filename"} if "filename" in words else set()
    assert keys - words == set()


def test_man_page_see_also() -> None:
    text = section(man_source(), "SEE ALSO")
    for ref in (r"qbitmap\-check (1)", r"qbitmap\-recover (1)", r"qbitmap\-levels (5)"):
        assert f".BR {ref}" in text


def test_man_page_renders() -> None:
    qemu.require_tools("man")
    proc = run("man", "-l", str(MAN), env={"MANPAGER": "cat", "MANWIDTH": "80", "PAGER": "cat"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(re.sub(r".\x08", "", proc.stdout).split())
    assert "qbitmap - inspect, check and repair" in text
