"""Shared pieces of the qbitmap benchmarks (``bench/run`` runs every ``bench_*.py``).

* :func:`big_image` builds, once, the benchmark image every bench uses: a
  2 TiB qcow2 with one 64 KiB-granularity bitmap ``b0`` after 200,000
  scattered 64 KiB writes (deterministic seed), cached in ``bench/work/``.
* :func:`measure` runs one command and returns its wall time, CPU time and
  peak RSS (``os.wait4``: the rusage of that child alone).
* :func:`nbd_dirty_map` is the pipeline users run today to read a bitmap:
  ``qemu-nbd -r -B NAME`` on a unix socket, then ``nbdinfo --json --map``.
* :func:`save_results` / :func:`print_table` write ``bench/results/NAME.json``
  and a plain table on stdout.

Nothing here is a timed test: benchmarks report, they do not assert.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import random
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
RESULTS_DIR = BENCH_DIR / "results"

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class BigImageSpec:
    """Parameters of the benchmark image (part of its cache file name)."""

    virtual_size: int = 2 * TiB
    granularity: int = 64 * KiB
    writes: int = 200_000
    write_size: int = 64 * KiB
    seed: int = 20_240_601
    bitmap: str = "b0"

    @property
    def filename(self) -> str:
        return (
            f"big-{self.virtual_size // GiB}G-g{self.granularity // KiB}k-"
            f"w{self.writes}x{self.write_size // KiB}k-s{self.seed}.qcow2"
        )


BIG = BigImageSpec()


def write_offsets(spec: BigImageSpec = BIG) -> list[int]:
    """The guest offsets written into the benchmark image, in write order.

    Scattered uniformly over the disk, aligned to the write size; the same
    list for the same spec on every machine (``random.Random(seed)``).
    """
    rng = random.Random(spec.seed)
    slots = spec.virtual_size // spec.write_size
    return [rng.randrange(slots) * spec.write_size for _ in range(spec.writes)]


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(f"bench: missing tools: {', '.join(missing)} (Debian: qemu-utils, libnbd-bin)")


def big_image(workdir: Path = WORK_DIR, spec: BigImageSpec = BIG) -> Path:
    """Path of the benchmark image in *workdir*, building it on first use.

    The image is built with ``qemu-img create`` + ``qemu-img bitmap --add``,
    then one ``qemu-io -t unsafe`` process performs the writes as
    write-zeroes requests (``write -z``: the bitmap is dirtied exactly as by
    a data write, but no data lands in the file, so it is a few hundred MiB
    and builds in seconds).  QEMU stores the bitmap on its clean exit.
    Concurrent callers wait for one builder (an flock on ``big.lock``).
    Delete ``bench/work/`` to force a rebuild.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / spec.filename
    with open(workdir / "big.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        _require("qemu-img", "qemu-io")
        tmp = workdir / (spec.filename + ".tmp")
        tmp.unlink(missing_ok=True)
        start = time.monotonic()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(spec.virtual_size)],
            check=True,
        )
        subprocess.run(
            ["qemu-img", "bitmap", "--add", "-g", str(spec.granularity), str(tmp), spec.bitmap],
            check=True,
        )
        script = "".join(
            f"write -q -z {offset} {spec.write_size}\n" for offset in write_offsets(spec)
        )
        proc = subprocess.run(
            ["qemu-io", "-t", "unsafe", "-f", "qcow2", str(tmp)],
            input=script.encode(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0 or proc.stderr.strip():
            tmp.unlink(missing_ok=True)
            sys.exit(f"bench: qemu-io failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(tmp)],
                check=True,
                capture_output=True,
            ).stdout
        )
        bitmaps = info["format-specific"]["data"].get("bitmaps", [])
        if [(b["name"], b["flags"]) for b in bitmaps] != [(spec.bitmap, ["auto"])]:
            tmp.unlink(missing_ok=True)
            sys.exit(f"bench: unexpected bitmaps in the built image: {bitmaps}")
        os.replace(tmp, path)
        print(
            f"bench: built {path.name} ({path.stat().st_size / MiB:.0f} MiB) "
            f"in {time.monotonic() - start:.1f} s",
            file=sys.stderr,
        )
        return path


@dataclass
class Measurement:
    """One process (or pipeline) run: times in seconds, RSS in KiB."""

    argv: list[str]
    wall: float
    user: float = 0.0
    sys: float = 0.0
    maxrss_kib: int = 0
    returncode: int = 0
    maxrss_exact: bool = True
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TIME = shutil.which("time", path="/usr/bin:/bin")


def measure(
    argv: Sequence[str],
    *,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    stderr: IO[bytes] | int | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> Measurement:
    """Run *argv* to completion; wall time, CPU times and peak RSS of that process.

    Peak RSS is taken by GNU ``/usr/bin/time -f %M`` (Debian package
    ``time``), which forks the command from its own small image.  Reading
    ``ru_maxrss`` of a child that Python starts directly is wrong on Linux:
    Python spawns with vfork, and exec records the *parent's* peak RSS as the
    child's floor.  Without GNU time the ``os.wait4`` value is used and
    ``maxrss_exact`` in the result is False.
    """
    with tempfile.NamedTemporaryFile(prefix="qbitmap-bench-time-", mode="r") as rss_file:
        wrapped = list(argv)
        if TIME:
            wrapped = [TIME, "-q", "-f", "%M", "-o", rss_file.name, *wrapped]
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv))
        maxrss = usage.ru_maxrss
        if TIME:
            text = rss_file.read().split()
            maxrss = int(text[-1]) if text and text[-1].isdigit() else 0
    return Measurement(
        argv=list(argv),
        wall=wall,
        user=usage.ru_utime,
        sys=usage.ru_stime,
        maxrss_kib=maxrss,
        returncode=proc.returncode,
        maxrss_exact=bool(TIME),
    )


@contextlib.contextmanager
def qemu_nbd_server(image: Path, bitmap: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A read-only ``qemu-nbd -B BITMAP`` on a fresh unix socket; yields (nbd URI, process)."""
    with tempfile.TemporaryDirectory(prefix="qbitmap-bench-") as tmp:
        sock = Path(tmp) / "nbd.sock"
        proc = subprocess.Popen(
            ["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, "-k", str(sock), "-t", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # The socket file appears at bind(); connect() succeeds once it listens.
            while not _accepts(sock):
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"qemu-nbd exited with {proc.returncode}: {err}")
                time.sleep(0.001)
            yield f"nbd+unix:///?socket={sock}", proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _accepts(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def _vm_hwm_kib(pid: int) -> int:
    """Peak RSS of a running process (``VmHWM``; not skewed by how it was spawned)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def nbd_dirty_map(image: Path, bitmap: str, *, stdout: IO[bytes] | int | None) -> Measurement:
    """Time the users' pipeline: start qemu-nbd, wait for its socket, nbdinfo --map, stop.

    ``wall`` covers all of it (server start to server exit).  ``maxrss_kib``
    is the larger of the two processes' peaks; ``parts`` has each one.
    """
    _require("qemu-nbd", "nbdinfo")
    start = time.perf_counter()
    with qemu_nbd_server(image, bitmap) as (uri, server):
        client = measure(
            ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri], stdout=stdout
        )
        server_hwm = _vm_hwm_kib(server.pid)
        server.send_signal(signal.SIGTERM)
        _, _, server_usage = os.wait4(server.pid, 0)
        server.returncode = 0
    wall = time.perf_counter() - start
    return Measurement(
        argv=["qemu-nbd", "-r", "-B", bitmap, "+", *client.argv],
        wall=wall,
        user=client.user + server_usage.ru_utime,
        sys=client.sys + server_usage.ru_stime,
        maxrss_kib=max(client.maxrss_kib, server_hwm),
        parts={
            "nbdinfo": {"wall": client.wall, "maxrss_kib": client.maxrss_kib},
            "qemu-nbd": {"maxrss_kib": server_hwm},
        },
    )


def alternate(
    ours: Callable[[], Measurement], peer: Callable[[], Measurement], runs: int
) -> tuple[list[Measurement], list[Measurement]]:
    """*runs* rounds of ``ours()`` then ``peer()``, so both see the same machine conditions."""
    ours_runs: list[Measurement] = []
    peer_runs: list[Measurement] = []
    for _ in range(runs):
        ours_runs.append(ours())
        peer_runs.append(peer())
    return ours_runs, peer_runs


def best_of(runs: int, fn: Any, *args: Any, **kwargs: Any) -> tuple[Measurement, list[float]]:
    """Run ``fn(*args, **kwargs)`` *runs* times; the fastest Measurement and all wall times."""
    results = [fn(*args, **kwargs) for _ in range(runs)]
    return min(results, key=lambda m: m.wall), [m.wall for m in results]


def python_baseline() -> Measurement:
    """Peak RSS / time of a bare interpreter (``python -c pass``), for context."""
    return measure([sys.executable, "-c", "pass"])


def qbitmap_argv(*args: str) -> list[str]:
    """argv running qbitmap as users do: the ``qbitmap`` console script installed
    next to the current interpreter, else ``python -m qbitmap``.
    """
    script = Path(sys.executable).with_name("qbitmap")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-m", "qbitmap", *args]


def compile_bytecode() -> None:
    """Write qbitmap's .pyc files, as ``pip install`` does.

    Development shells often set PYTHONDONTWRITEBYTECODE, so an editable
    checkout would otherwise recompile every module on every run and the
    benchmark would time the compiler.
    """
    import compileall

    compileall.compile_dir(str(REPO_DIR / "qbitmap"), quiet=1)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""

    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except OSError:
            return "missing"
        return out.splitlines()[0] if out else "unknown"

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "qemu-img": version(["qemu-img", "--version"]),
        "nbdinfo": version(["nbdinfo", "--version"]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/NAME.json`` (atomically) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
