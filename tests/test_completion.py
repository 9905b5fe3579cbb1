"""Shell completion (click's protocol) for bash, zsh and fish, run as a shell runs it.

Each test runs the real program with ``_QBITMAP_COMPLETE`` set, as the
scripts that ``_QBITMAP_COMPLETE=bash_source qbitmap`` (zsh_source,
fish_source) print do on every Tab press; the bash one is also sourced in a
real bash.  ``-b`` completes the bitmap names of the images already on the
command line, and a missing, damaged or hostile image must never make it
print a traceback, hang, or hand a terminal escape sequence to the shell.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import corrupt
import pytest
import qemu

MiB = 1 << 20
SCRIPT = shutil.which("qbitmap", path=str(Path(sys.executable).parent)) or "qbitmap"


def complete(shell: str, words: str, cword: int | str, **env: str) -> subprocess.CompletedProcess:
    """One completion request, as the shell's script sends it."""
    return subprocess.run(
        [SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
        env={
            **os.environ,
            "_QBITMAP_COMPLETE": f"{shell}_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            **env,
        },
    )


def bash_values(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # click ends the answer with a newline, even an empty answer.
    return [line.partition(",")[2] for line in proc.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    qemu.require_tools("qemu-img", "qemu-io")
    root = tmp_path_factory.mktemp("complete")
    disk = qemu.create_image(root / "disk.qcow2", 16 * MiB)
    for name in ("daily", "weekly", "dev-1"):
        qemu.add_bitmap(disk, name)
    other = qemu.create_image(root / "other.qcow2", 16 * MiB)
    qemu.add_bitmap(other, "monthly")
    hostile = qemu.create_image(root / "hostile.qcow2", 16 * MiB)
    for name in ("ok", "has space", "esc\x1b[31m", "new\nline"):
        qemu.add_bitmap(hostile, name)
    damaged = root / "damaged.qcow2"
    shutil.copyfile(disk, damaged)
    corrupt.EDITS["dir-offset-past-eof"](corrupt.layout(damaged))
    fifo = root / "fifo"
    os.mkfifo(fifo)
    return {
        "disk": disk,
        "other": other,
        "hostile": hostile,
        "damaged": damaged,
        "fifo": fifo,
        "missing": root / "missing.qcow2",
        "text": _text_file(root / "notes.txt"),
    }


def _text_file(path: Path) -> Path:
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize("command", ["dump", "check", "recover"])
def test_b_completes_the_bitmap_names_of_the_image(images: dict[str, Path], command: str) -> None:
    line = f"qbitmap {command} {images['disk']} -b "
    assert bash_values(complete("bash", line, 4)) == ["daily", "weekly", "dev-1"]
    assert bash_values(complete("bash", line + "d", 4)) == ["daily", "dev-1"]
    line = f"qbitmap {command} {images['disk']} --bitmap w"
    assert bash_values(complete("bash", line, 4)) == ["weekly"]


def test_names_of_every_image_on_the_line_and_after_other_options(
    images: dict[str, Path],
) -> None:
    line = f"qbitmap --quiet dump --extents {images['disk']} {images['other']} -b daily -b "
    assert bash_values(complete("bash", line, 9)) == ["daily", "weekly", "dev-1", "monthly"]


@pytest.mark.parametrize("image", ["missing", "damaged", "fifo", "text"])
def test_an_image_that_cannot_be_read_offers_nothing_and_says_nothing(
    images: dict[str, Path], image: str
) -> None:
    proc = complete("bash", f"qbitmap check {images[image]} -b ", 4)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "", "")
    # ... and does not stop the names of the image beside it.
    proc = complete("bash", f"qbitmap check {images[image]} {images['disk']} -b da", 5)
    assert bash_values(proc) == ["daily"]


def test_no_image_yet_offers_nothing(images: dict[str, Path]) -> None:
    assert bash_values(complete("bash", "qbitmap dump -b ", 3)) == []


def test_hostile_names_never_reach_the_shell(images: dict[str, Path]) -> None:
    proc = complete("bash", f"qbitmap dump {images['hostile']} -b ", 4)
    assert bash_values(proc) == ["ok"]
    assert "\x1b" not in proc.stdout


def test_zsh_and_fish_protocols(images: dict[str, Path]) -> None:
    zsh = complete("zsh", f"qbitmap dump {images['disk']} -b w", 4)
    assert zsh.returncode == 0 and zsh.stderr == ""
    assert zsh.stdout.splitlines() == ["plain", "weekly", "_"]
    fish = complete("fish", f"qbitmap check {images['disk']} -b we", "we")
    assert fish.returncode == 0 and fish.stderr == ""
    assert fish.stdout.splitlines() == ["plain,weekly"]


def test_options_and_commands_complete_too(images: dict[str, Path]) -> None:
    assert "check" in bash_values(complete("bash", "qbitmap ch", 1))
    values = bash_values(complete("bash", f"qbitmap dump {images['disk']} --", 3))
    for option in ("--map", "--output", "--json", "--extents", "--bitmap"):
        assert option in values
    values = bash_values(complete("bash", "qbitmap check --output ", 3))
    assert values == ["human", "json"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_source_scripts_are_printed(shell: str) -> None:
    proc = subprocess.run(
        [SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "_QBITMAP_COMPLETE": f"{shell}_source"},
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert "_QBITMAP_COMPLETE" in proc.stdout and f"{shell}_complete" in proc.stdout


def test_bash_itself_completes_bitmap_names(images: dict[str, Path]) -> None:
    """Source the script in a real bash and call the function bash calls on Tab."""
    qemu.require_tools("bash")
    source = subprocess.run(
        [SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "_QBITMAP_COMPLETE": "bash_source"},
    ).stdout
    program = (
        source
        + f"\nCOMP_WORDS=(qbitmap dump {images['disk']} -b d)\nCOMP_CWORD=4\n"
        + "_qbitmap_completion qbitmap\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    env = {**os.environ, "PATH": f"{Path(SCRIPT).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["daily", "dev-1"]
