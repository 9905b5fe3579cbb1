"""How every run of the real ``qbitmap`` program ends: exit status, stderr, and JSON for scripts.

* a FIFO, socket, directory, character device, missing or unreadable file
  as IMAGE (or --reference) is refused at once: one line naming it, exit 1;
* ``check --json`` and ``recover --json`` print one JSON object for every
  exit status (0, 1, 2, 3, 4, 64, 75, 130), usage errors included, with the
  report's keys plus ``error`` and ``exit_code``;
* SIGINT at any moment (while Python imports click, while reading, while
  recover writes) is ``qbitmap: interrupted`` and exit 130, no traceback;
* a reader that closes stdout early ends the command quietly with exit 0.

Every run is a real process (the installed console script); signals are
real, delivered by ``strace`` when the process reaches a chosen system
call; pipes are real pipes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import corrupt
import pytest
import qemu

MiB = 1 << 20
SCRIPT = shutil.which("qbitmap", path=str(Path(sys.executable).parent)) or "qbitmap"
CHECK_KEYS = {"filename", "findings", "bitmaps", "exit_code", "error"}
RECOVER_KEYS = {
    "filename",
    "dry_run",
    "status",
    "bitmaps",
    "reference",
    "leaked_clusters_reclaimed",
    "clusters_allocated",
    "clusters_freed",
    "steps",
    "writes",
    "findings",
    "exit_code",
    "error",
}


def qbitmap(
    *args: object, prefix: list[str] | None = None, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess:
    """The installed console script, stdout and stderr captured as text."""
    return subprocess.run(
        [*(prefix or []), SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )


def one_json_object(stdout: str) -> dict:
    """*stdout* is exactly one JSON object (and its newline)."""
    document, end = json.JSONDecoder().raw_decode(stdout)
    assert stdout[end:].strip() == "", stdout
    assert isinstance(document, dict)
    return document


def assert_one_error_line(stderr: str, *needles: str) -> None:
    assert stderr.startswith("qbitmap: error: ") and stderr.count("\n") == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only images made by QEMU, one per verdict of check."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    root = tmp_path_factory.mktemp("exits")
    clean = qemu.create_image(root / "clean.qcow2", 64 * MiB)
    qemu.add_bitmap(clean, "b0")
    qemu.qemu_io_write(clean, [(0, 65536), (9 * MiB, 4096)])
    in_use = root / "in-use.qcow2"
    shutil.copyfile(clean, in_use)
    qemu.crash_image(in_use, [(20 * MiB, 65536)], bitmaps=("b0",))
    corrupt_image = root / "corrupt.qcow2"
    shutil.copyfile(clean, corrupt_image)
    lay = corrupt.layout(corrupt_image)
    corrupt.poke(corrupt_image, lay.entry("b0").offset + 16, ">B", 2)  # type 2: QEMU refuses it
    leaky = root / "leaky.qcow2"
    shutil.copyfile(clean, leaky)
    corrupt.EDITS["data-refcount-2"](corrupt.layout(leaky))  # leaks only: exit 3
    out = {"clean": clean, "in-use": in_use, "corrupt": corrupt_image, "leaky": leaky}
    for path in out.values():
        path.chmod(0o444)
    return out


def writable(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    return copy


# -- files that are not images ----------------------------------------------------------


@pytest.fixture
def not_images(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    return {
        "a FIFO": fifo,
        "a socket": sock,
        "a directory": tmp_path,
        "a character device": Path("/dev/null"),
        "missing": tmp_path / "missing.qcow2",
    }


WHY = {
    "a FIFO": "is a FIFO",
    "a socket": "is a socket",
    "a directory": "is a directory",
    "a character device": "is a character device",
    "missing": "cannot open: No such file or directory",
}


@pytest.mark.parametrize("command", ["dump", "check", "recover"])
def test_what_is_not_an_image_is_refused_at_once(
    command: str, not_images: dict[str, Path], images: dict[str, Path]
) -> None:
    extra = ["--mode", "full"] if command == "recover" else []
    for kind, path in not_images.items():
        start = time.monotonic()
        proc = qbitmap(command, *extra, path, timeout=30)
        assert time.monotonic() - start < 20
        assert proc.returncode == 1, (kind, proc.returncode, proc.stderr)
        assert_one_error_line(proc.stderr, f"{path}: {WHY[kind]}")
        if command == "check":
            assert "image-unreadable" in proc.stdout
        else:
            assert proc.stdout == ""
        if command != "dump":
            document = one_json_object(qbitmap(command, "--json", *extra, path).stdout)
            assert document["exit_code"] == 1 and f"{path}: {WHY[kind]}" in document["error"]


def test_a_reference_that_is_not_an_image_is_refused(
    not_images: dict[str, Path], images: dict[str, Path], tmp_path: Path
) -> None:
    image = writable(images["in-use"], tmp_path)
    before = image.read_bytes()
    for kind, path in not_images.items():
        proc = qbitmap("recover", "--json", "--reference", path, image, timeout=30)
        assert proc.returncode == 1, (kind, proc.stderr)
        assert_one_error_line(proc.stderr, f"{path}: {WHY[kind]}")
        document = one_json_object(proc.stdout)
        assert document["status"] == "failed" and document["filename"] == str(image)
    assert image.read_bytes() == before


def test_an_unreadable_file_is_exit_1(images: dict[str, Path], tmp_path: Path) -> None:
    """Root reads any file: the process runs without CAP_DAC_OVERRIDE/READ_SEARCH instead."""
    qemu.require_tools("setpriv")
    path = writable(images["clean"], tmp_path)
    path.chmod(0)
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if os.geteuid() != 0:
        drop = []
    for args in (["dump"], ["check"], ["recover", "--mode", "full"]):
        proc = qbitmap(*args, path, prefix=drop)
        assert proc.returncode == 1, (args, proc.stderr)
        assert_one_error_line(proc.stderr, f"{path}: cannot open: Permission denied")


# -- JSON for every exit status -----------------------------------------------------------


def test_check_json_for_every_exit_status(images: dict[str, Path], tmp_path: Path) -> None:
    runs = {
        0: ["check", "--json", images["clean"]],
        1: ["check", "--json", tmp_path / "missing.qcow2"],
        2: ["check", "--json", images["corrupt"]],
        3: ["check", "--json", images["leaky"]],
        4: ["check", "--json", images["in-use"]],
        64: ["check", "--json", "--frob", images["clean"]],
    }
    for code, args in runs.items():
        proc = qbitmap(*args)
        assert proc.returncode == code, (args, proc.stderr)
        document = one_json_object(proc.stdout)
        assert set(document) == CHECK_KEYS and document["exit_code"] == code, document
        assert (document["error"] is None) == (code not in (1, 64)), document
    for args in (["check", "--json"], ["check", "--json", "-b", "nope", images["clean"]]):
        proc = qbitmap(*args)
        assert proc.returncode == 64
        document = one_json_object(proc.stdout)
        assert document["exit_code"] == 64 and document["error"] == proc.stderr[16:-1]


def test_check_json_on_an_image_a_writer_holds(images: dict[str, Path], tmp_path: Path) -> None:
    image = writable(images["clean"], tmp_path)
    with qemu.StorageDaemon(image, writable=True):
        proc = qbitmap("check", "--json", image)
    document = one_json_object(proc.stdout)
    assert proc.returncode == document["exit_code"] and proc.returncode in (4, 75)


def test_recover_json_for_every_exit_status(images: dict[str, Path], tmp_path: Path) -> None:
    in_use = writable(images["in-use"], tmp_path)
    held = tmp_path / "held.qcow2"
    shutil.copyfile(images["in-use"], held)
    corrupt_image = writable(images["corrupt"], tmp_path)
    runs: list[tuple[int, str, list[object]]] = [
        (1, "failed", ["recover", "--json", in_use]),  # no mode applies
        (1, "failed", ["recover", "--json", "--mode", "full", tmp_path / "missing.qcow2"]),
        (2, "refused", ["recover", "--json", "--mode", "full", corrupt_image]),
        (64, "usage-error", ["recover", "--json", "--mode", "bogus", in_use]),
        (64, "usage-error", ["recover", "--json", "--mode", "full", "--reference", in_use, in_use]),
        (64, "usage-error", ["recover", "--json", "--mode", "full", "-b", "nope", in_use]),
        (64, "usage-error", ["recover", "--json"]),
        (0, "dry-run", ["recover", "--json", "--dry-run", "--mode", "full", in_use]),
        (0, "recovered", ["recover", "--json", "--mode", "full", in_use]),
        (0, "nothing-to-do", ["recover", "--json", "--mode", "full", in_use]),
    ]
    for code, status, args in runs:
        before = corrupt_image.read_bytes()
        proc = qbitmap(*args)
        assert proc.returncode == code, (args, proc.stderr)
        document = one_json_object(proc.stdout)
        assert set(document) == RECOVER_KEYS, document
        assert document["exit_code"] == code and document["status"] == status, document
        if code:
            assert document["error"] == proc.stderr[len("qbitmap: error: ") : -1]
        else:
            assert document["error"] is None
        assert corrupt_image.read_bytes() == before
    with qemu.StorageDaemon(held, writable=True):
        proc = qbitmap("recover", "--json", "--mode", "full", held)
    document = one_json_object(proc.stdout)
    assert proc.returncode == 75 and document["exit_code"] == 75, proc.stderr
    assert document["status"] == "busy" and str(held) in document["error"]


# -- SIGINT at any moment -------------------------------------------------------------------


def click_files() -> list[str]:
    """click's core module and its bytecode: touched while qbitmap.cli is being imported."""
    import importlib.util

    import click.core

    source = click.core.__file__
    assert source is not None
    return [source, importlib.util.cache_from_source(source)]


def interrupt_at(paths: list[object], syscall: str, nth: int) -> list[str]:
    """strace delivering SIGINT when the process makes its *nth* *syscall* on one of *paths*."""
    qemu.require_tools("strace")
    argv = ["strace", "-f", "-qq", "-o", "/dev/null"]
    for path in paths:
        argv += ["-P", str(path)]
    return [*argv, "-e", f"trace={syscall}", "-e", f"inject={syscall}:signal=SIGINT:when={nth}"]


@pytest.fixture(scope="module")
def many_ranges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 dirty ranges: outputs far larger than a pipe's buffer."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = qemu.create_image(tmp_path_factory.mktemp("many") / "many.qcow2", 1 << 30)
    qemu.add_bitmap(path, "b0", granularity=512)
    qemu.qemu_io_write(path, [(i * 8192, 512) for i in range(20000)], unsafe=True)
    path.chmod(0o444)
    return path


def assert_interrupted(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr == "qbitmap: interrupted\n", proc.stderr


@pytest.mark.parametrize(
    "args", [["dump"], ["check", "--json"], ["recover", "--json", "--mode", "full"]]
)
def test_sigint_while_importing(args: list[str], images: dict[str, Path], tmp_path: Path) -> None:
    image = writable(images["in-use"], tmp_path)
    before = image.read_bytes()
    proc = qbitmap(*args, image, prefix=interrupt_at(click_files(), "%file", 1))
    assert_interrupted(proc)
    assert proc.stdout == ""  # before the command was even parsed: nothing to report
    assert image.read_bytes() == before


def test_sigint_while_dump_reads(many_ranges: Path) -> None:
    for form in (["--extents"], ["--json", "--extents"], ["--lines"]):
        proc = qbitmap("dump", *form, many_ranges, prefix=interrupt_at([many_ranges], "pread64", 3))
        assert_interrupted(proc)


def test_sigint_while_check_reads(images: dict[str, Path]) -> None:
    for nth in (1, 4):
        proc = qbitmap(
            "check",
            "--json",
            images["in-use"],
            prefix=interrupt_at([images["in-use"]], "pread64", nth),
        )
        assert_interrupted(proc)
        document = one_json_object(proc.stdout)
        assert set(document) == CHECK_KEYS
        assert document["exit_code"] == 130 and document["error"] == "interrupted"


def test_sigint_while_blocked_writing_to_a_reader_that_stopped_reading(many_ranges: Path) -> None:
    """A real kill(SIGINT), as a terminal sends it, while write() waits on a full pipe."""
    for form in (["--lines"], ["--extents"], ["--json", "--extents"]):
        read_end, write_end = os.pipe()
        proc = subprocess.Popen(
            [SCRIPT, "dump", *form, str(many_ranges)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        os.close(write_end)
        try:
            # The pipe fills (64 KiB) and the writer blocks: wait for that, then interrupt.
            deadline = time.monotonic() + 60
            while "pipe_write" not in _wchan(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "pipe_write" in _wchan(proc.pid), form
            proc.send_signal(signal.SIGINT)
            # Nobody reads: the interrupted process must not wait for a reader.
            _, stderr = proc.communicate(timeout=30)
        finally:
            os.close(read_end)
        assert (proc.returncode, stderr.decode()) == (130, "qbitmap: interrupted\n"), form


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


@pytest.mark.parametrize(("syscall", "nth"), [("pwrite64", 1), ("pwrite64", 3), ("fsync", 1)])
def test_sigint_while_recover_writes(
    images: dict[str, Path], tmp_path: Path, syscall: str, nth: int
) -> None:
    image = writable(images["in-use"], tmp_path)
    proc = qbitmap(
        "recover", "--json", "--mode", "full", image, prefix=interrupt_at([image], syscall, nth)
    )
    assert_interrupted(proc)
    document = one_json_object(proc.stdout)
    assert set(document) == RECOVER_KEYS
    assert document["status"] == "interrupted" and document["exit_code"] == 130
    # The run stopped part way; QEMU still opens the image and the rerun finishes the job.
    rc, report = qemu.img_check(image)
    assert rc in (0, 3) and not report.get("corruptions"), report
    assert qemu.lock_bytes_held(image) == set()
    again = qbitmap("recover", "--json", "--mode", "full", image)
    assert again.returncode == 0, again.stderr
    assert "in-use" not in qemu.img_bitmaps(image)["b0"]["flags"]


# -- a reader that goes away --------------------------------------------------------------


def run_into_closed_pipe(args: list[object], keep_lines: int) -> subprocess.CompletedProcess:
    """Run with stdout a real pipe whose reader reads *keep_lines* lines, then closes it."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [SCRIPT, *map(str, args)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        for _ in range(keep_lines):
            reader.readline()
    _, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, "", stderr.decode())


@pytest.mark.parametrize(
    "args",
    [
        ["dump"],
        ["dump", "--extents"],
        ["dump", "--lines"],
        ["dump", "--json"],
        ["dump", "--json", "--extents"],
        ["check"],
        ["check", "--json"],
        ["recover", "--dry-run", "--mode", "full"],
        ["recover", "--json", "--dry-run", "--mode", "full"],
    ],
    ids=" ".join,
)
@pytest.mark.parametrize("keep_lines", [0, 3])
def test_a_closed_stdout_ends_quietly_with_exit_0(
    args: list[str], keep_lines: int, many_ranges: Path, images: dict[str, Path]
) -> None:
    image = images["in-use"] if args[0] == "recover" else many_ranges
    proc = run_into_closed_pipe([*args, image], keep_lines)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_head_in_a_shell_pipeline_exits_0(many_ranges: Path) -> None:
    """The shell form of the report: ``dump --extents IMG | head -3`` ends the pipeline with 0."""
    for form in ("--extents", "--lines", "--json --extents", ""):
        proc = subprocess.run(
            ["bash", "-c", f'set -o pipefail; "{SCRIPT}" dump {form} "{many_ranges}" | head -3'],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (proc.returncode, proc.stderr) == (0, ""), form
        assert proc.stdout.count("\n") == 3 or form.startswith("--json")


def test_script_is_the_installed_entry_point() -> None:
    assert Path(SCRIPT).is_file() and stat.S_IMODE(Path(SCRIPT).stat().st_mode) & 0o111
    assert "qbitmap.entry" in Path(SCRIPT).read_text()


def test_the_entry_point_imports_nothing_before_its_handler() -> None:
    """Everything imported before the SIGINT handler is a window for a traceback."""
    from qbitmap import interrupt
    from qbitmap.errors import ExitCode

    assert interrupt.INTERRUPTED == ExitCode.INTERRUPTED
    listing = "import sys; {}print('\\n'.join(sys.modules))"
    bare, loaded = (
        subprocess.run(
            [sys.executable, "-c", listing.format(extra)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for extra in ("", "import qbitmap.entry; ")
    )
    assert set(loaded) - set(bare) <= {"qbitmap", "qbitmap.entry", "qbitmap.interrupt", "signal"}
