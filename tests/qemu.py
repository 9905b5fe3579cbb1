"""Helpers that drive the real QEMU tools for qbitmap's test suites.

This is a plain module: importing it needs nothing but the standard library
(pytest is imported lazily, only by :func:`require_tools` when it has to skip).
Every helper shells out to a real tool -- ``qemu-img``, ``qemu-io``,
``qemu-nbd``, ``qemu-storage-daemon``, ``nbdinfo`` -- so the tests compare
qbitmap against what QEMU itself does, not against our reading of QEMU.

Conventions:

* every subprocess has a timeout; a helper that times out raises
  :class:`QemuError` (never hangs), and background processes are always
  stopped in ``finally`` blocks (plus an ``atexit`` safety net);
* every helper calls :func:`require_tools` for the tools it needs, so a test
  that uses a helper is skipped on a developer machine without QEMU, and
  *fails* in CI (``CI`` set in the environment), where skipping is forbidden;
* sizes and offsets are bytes (ints) unless a string like ``"1G"`` is passed
  straight through to ``qemu-img``;
* UNIX sockets live in a short private directory under ``/tmp`` (socket paths
  are limited to 107 bytes, pytest's ``tmp_path`` can be longer).

Facts about QEMU 7.2 that these helpers rely on are recorded, with the
commands that showed them, in ``docs/qemu-facts.md``.
"""

from __future__ import annotations

import atexit
import fcntl
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

__all__ = [
    "DEFAULT_TIMEOUT",
    "GOLDEN_DIR",
    "LOCK_BYTES",
    "QemuError",
    "QemuNbd",
    "StorageDaemon",
    "add_bitmap",
    "append_header_extension",
    "bitmap_directory",
    "bitmap_op",
    "crash_image",
    "create_image",
    "edit_bitmap_flags",
    "golden_image",
    "guest_read",
    "header_extensions",
    "images_identical",
    "img_bitmaps",
    "img_check",
    "img_info",
    "lock_bytes_held",
    "merge_extents",
    "nbd_data_read",
    "nbd_dirty_extents",
    "nbd_map",
    "opens_read_write",
    "qemu_img",
    "qemu_io",
    "qemu_io_write",
    "read_autoclear",
    "require",
    "require_tools",
    "set_autoclear_bits",
]

#: Seconds any single helper waits for a tool before giving up.
DEFAULT_TIMEOUT = 120.0

#: The bytes QEMU's file-posix driver locks: 100+i "holds permission i",
#: 200+i "does not share permission i" (i = 0..3; 4 only for QEMU <= 6.1).
LOCK_BYTES = tuple(range(100, 105)) + tuple(range(200, 205))

#: Directory of the gzipped golden images made by ``generate.sh``.
GOLDEN_DIR = Path(__file__).resolve().parent / "fixtures" / "golden"

# NBD protocol constants used by the readiness probe.
_NBD_MAGIC = b"NBDMAGIC"
_NBD_IHAVEOPT = b"IHAVEOPT"
_NBD_OPT_ABORT = 2
_NBD_FLAG_C_FIXED_NEWSTYLE = 1


class QemuError(RuntimeError):
    """A QEMU tool failed, misbehaved or did not answer in time."""


# ---------------------------------------------------------------------------
# Tool discovery
# ---------------------------------------------------------------------------


def require_tools(*names: str) -> None:
    """Make sure every executable in *names* is on ``PATH``.

    If one is missing: raise :class:`RuntimeError` when the ``CI`` environment
    variable is set (tests must never skip in CI), otherwise call
    ``pytest.skip`` (pytest is imported only then).
    """
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = "missing QEMU test tools: " + ", ".join(missing)
    if os.environ.get("CI"):
        raise RuntimeError(
            msg + " (CI is set: tests may not skip; run scripts/install-test-deps.sh)"
        )
    import pytest

    pytest.skip(msg + " (install qemu-utils, qemu-system-common, libnbd-bin)")


def require(condition: bool, reason: str) -> None:
    """Go on only if *condition* holds: otherwise skip the test, or fail it when ``CI`` is set.

    For needs :func:`require_tools` cannot see (root, a loop device).
    """
    if condition:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason} (CI is set: tests may not skip)")
    import pytest

    pytest.skip(reason)


# ---------------------------------------------------------------------------
# Running tools
# ---------------------------------------------------------------------------


def _tail(text: str | None, lines: int = 20) -> str:
    if not text:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _run(
    args: Sequence[str | os.PathLike],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess:
    """Run *args* with text I/O captured and a timeout.

    Raises :class:`QemuError` on timeout, and on a non-zero exit if *check*.
    """
    argv = [os.fspath(a) for a in args]
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"timed out after {timeout}s: {_shown(argv)}") from exc
    if check and proc.returncode != 0:
        raise QemuError(
            f"{_shown(argv)} exited with {proc.returncode}\n"
            f"--- stdout (tail) ---\n{_tail(proc.stdout)}\n"
            f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
        )
    return proc


def _shown(argv: Sequence[str], limit: int = 12) -> str:
    if len(argv) > limit:
        argv = [*argv[:limit], f"... ({len(argv) - limit} more args)"]
    return " ".join(argv)


def qemu_img(
    *args: str | os.PathLike, check: bool = True, timeout: float = DEFAULT_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS...`` (text, stdout/stderr captured).

    With *check* (default) a non-zero exit raises :class:`QemuError` carrying
    the output. Note that ``qemu-img check`` uses exit codes 1-3 for findings:
    call it with ``check=False`` or use :func:`img_check`.
    """
    require_tools("qemu-img")
    return _run(["qemu-img", *args], check=check, timeout=timeout)


# ---------------------------------------------------------------------------
# Images and bitmaps
# ---------------------------------------------------------------------------


def create_image(
    path: str | os.PathLike,
    size: int | str | None,
    *,
    cluster_size: int = 65536,
    extended_l2: bool = False,
    compat: str = "1.1",
    backing: str | os.PathLike | None = None,
    backing_fmt: str | None = None,
    compression_type: str | None = None,
    extra_opts: Iterable[str] = (),
) -> Path:
    """Create a qcow2 image with ``qemu-img create -f qcow2 -o ...``.

    *size* may be ``None`` only with a *backing* file (then the backing file's
    size is used). *extra_opts* are further ``key=value`` creation options
    (``"lazy_refcounts=on"``, ``"refcount_bits=64"``, ...). When *backing* is
    given without *backing_fmt*, the backing file's format is read with
    :func:`img_info` (QEMU 7.2 refuses ``-b`` without ``-F``). Returns the path.
    """
    path = Path(path)
    opts = [f"cluster_size={cluster_size}", f"compat={compat}"]
    if extended_l2:
        opts.append("extended_l2=on")
    if compression_type is not None:
        opts.append(f"compression_type={compression_type}")
    opts.extend(extra_opts)
    args: list[str | os.PathLike] = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing is not None:
        if backing_fmt is None:
            backing_fmt = img_info(backing)["format"]
        args += ["-b", os.fspath(backing), "-F", backing_fmt]
    args.append(path)
    if size is not None:
        args.append(str(size))
    elif backing is None:
        raise ValueError("size is required without a backing file")
    qemu_img(*args)
    return path


def add_bitmap(
    path: str | os.PathLike,
    name: str,
    *,
    granularity: int | None = None,
    disabled: bool = False,
) -> None:
    """Add a persistent bitmap: ``qemu-img bitmap --add [-g G] [--disable] PATH NAME``."""
    args: list[str | os.PathLike] = ["bitmap", "--add"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    if disabled:
        args.append("--disable")
    qemu_img(*args, path, name)


def bitmap_op(path: str | os.PathLike, name: str, *ops: str) -> None:
    """Run ``qemu-img bitmap OPS... PATH NAME``.

    Example: ``bitmap_op(img, "b0", "--remove")``, ``bitmap_op(img, "b0",
    "--clear")``, ``bitmap_op(img, "b0", "--enable")``,
    ``bitmap_op(img, "b1", "--merge", "b0")``.
    """
    qemu_img("bitmap", *ops, path, name)


def img_info(path: str | os.PathLike, *, backing_chain: bool = False) -> dict:
    """Return ``qemu-img info -U --output=json PATH`` parsed.

    ``-U`` (force share) lets this work while another QEMU holds the image.
    With *backing_chain* the result is a list (one dict per chain member).
    """
    args = ["info", "-U", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*args, path).stdout)


def img_bitmaps(path: str | os.PathLike) -> dict[str, dict]:
    """Bitmaps as QEMU reports them: ``{name: {"granularity": g, "flags": [...]}}``.

    Flags are QEMU's strings, e.g. ``["in-use", "auto"]``.
    """
    info = img_info(path)
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


def img_check(
    path: str | os.PathLike, *, repair: str | None = None, force_share: bool = False
) -> tuple[int, dict]:
    """Run ``qemu-img check --output=json`` and return ``(returncode, report)``.

    Exit codes: 0 clean, 1 check could not run, 2 corruption, 3 leaks only
    (63 is "check not supported"). *repair* is ``"leaks"`` or ``"all"``
    (``-r``). If QEMU printed no JSON (e.g. the image cannot be opened) the
    report is ``{"error": <stderr>}``.
    """
    args: list[str | os.PathLike] = ["check", "--output=json"]
    if repair is not None:
        args += ["-r", repair]
    if force_share:
        args.append("-U")
    proc = qemu_img(*args, path, check=False)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {"error": proc.stderr.strip()}
    except json.JSONDecodeError:
        report = {"error": proc.stderr.strip(), "stdout": proc.stdout}
    return proc.returncode, report


def opens_read_write(path: str | os.PathLike) -> subprocess.CompletedProcess:
    """Open *path* read-write in QEMU and close it again (``qemu-io PATH -c quit``).

    What a VM start does to the image: bitmaps are loaded and validated,
    flagged in use in place, and stored again at the clean close.  This
    changes the file: pass a copy.  Returns the process (exit 0 = accepted).
    """
    require_tools("qemu-io")
    return _run(["qemu-io", "-f", "qcow2", path, "-c", "quit"], check=False)


def images_identical(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the guest data of two images is byte-identical (``qemu-img compare``)."""
    proc = qemu_img("compare", "-U", "-f", "qcow2", "-F", "qcow2", a, b, check=False)
    if proc.returncode not in (0, 1):
        raise QemuError(f"qemu-img compare failed: {proc.stderr.strip()}")
    return proc.returncode == 0


# ---------------------------------------------------------------------------
# qemu-io
# ---------------------------------------------------------------------------


def qemu_io(
    path: str | os.PathLike,
    *cmds: str,
    fmt: str = "qcow2",
    unsafe: bool = False,
    read_only: bool = False,
    force_share: bool = False,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Run qemu-io commands on *path* in ONE qemu-io process.

    The commands are fed on stdin (``qemu-io -f FMT PATH < cmds``); this has no
    argv size limit (``-c`` per command hits ARG_MAX near 50k commands) and
    was the fastest method measured (docs/qemu-facts.md). *path* may also be
    an NBD URI with ``fmt="raw"``. ``unsafe`` adds ``-t unsafe`` (flushes are
    ignored: much faster, fine for images that are closed cleanly),
    ``read_only`` adds ``-r``, ``force_share`` adds ``-U``.

    qemu-io 7.2 exits 1 if any command failed; with *check* that raises
    :class:`QemuError`. Default timeout: 120 s + 5 ms per command.
    """
    require_tools("qemu-io")
    args: list[str | os.PathLike] = ["qemu-io", "-f", fmt]
    if unsafe:
        args += ["-t", "unsafe"]
    if read_only:
        args.append("-r")
    if force_share:
        args.append("-U")
    args.append(path)
    if timeout is None:
        timeout = DEFAULT_TIMEOUT + 0.005 * len(cmds)
    script = "".join(c.rstrip("\n") + "\n" for c in cmds)
    proc = _run(args, input=script, check=False, timeout=timeout)
    if check:
        bad = [
            line
            for line in (proc.stdout + "\n" + proc.stderr).splitlines()
            if not _HEXDUMP_LINE.match(line) and (" failed" in line or "not found" in line)
        ]
        if proc.returncode != 0 or bad:
            raise QemuError(
                f"qemu-io on {os.fspath(path)} failed (exit {proc.returncode}):\n"
                + _tail("\n".join(bad) or proc.stderr or proc.stdout)
            )
    return proc


def qemu_io_write(
    path: str | os.PathLike,
    writes: Iterable[tuple[int, int]],
    *,
    pattern: int | None = None,
    unsafe: bool = False,
    zero: bool = False,
    sort: bool = False,
    fmt: str = "qcow2",
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """Write every ``(offset, length)`` in *writes* with one qemu-io process.

    Each becomes ``write -q [-P PATTERN | -z] OFFSET LENGTH``; *pattern* is a
    byte value (qemu-io's default is 0xcd). ``zero=True`` writes zeroes with
    ``-z`` instead: QEMU still marks the dirty bitmaps but qcow2 only sets zero
    flags in L2 entries, so no data clusters are allocated (13 GB vs 0.26 GB
    for 200,000 scattered writes on a 2 TiB image). ``sort=True`` issues the
    writes in offset order (~1.6x faster for scattered writes).
    ``unsafe=True`` adds ``-t unsafe``.
    """
    items = list(writes)
    if sort:
        items.sort()
    if zero:
        if pattern is not None:
            raise ValueError("pattern and zero are exclusive")
        flag = "-z "
    elif pattern is not None:
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"pattern must be a byte value, got {pattern!r}")
        flag = f"-P 0x{pattern:02x} "
    else:
        flag = ""
    cmds = [f"write -q {flag}{int(off)} {int(length)}" for off, length in items]
    return qemu_io(path, *cmds, fmt=fmt, unsafe=unsafe, timeout=timeout)


_HEXDUMP_LINE = re.compile(r"^(?:qemu-io> )?([0-9a-f]{8,}):  (.*)$")


def guest_read(
    path: str | os.PathLike,
    offset: int,
    length: int,
    *,
    fmt: str = "qcow2",
    force_share: bool = True,
) -> bytes:
    """Return *length* guest bytes at *offset*, as QEMU reads them.

    Uses ``read -v OFF LEN`` in ``qemu-io -r [-U]`` and parses the hex dump, so
    keep *length* modest (a few MiB). Works on an NBD URI with ``fmt="raw"``.
    """
    if length <= 0:
        return b""
    proc = qemu_io(
        path,
        f"read -v {offset} {length}",
        fmt=fmt,
        read_only=True,
        force_share=force_share and fmt != "raw",
    )
    out = bytearray()
    for line in proc.stdout.splitlines():
        m = _HEXDUMP_LINE.match(line)
        if not m:
            continue
        hexpart = m.group(2).partition("  ")[0]
        out += bytes.fromhex(hexpart)
    if len(out) != length:
        raise QemuError(f"read -v returned {len(out)} bytes, expected {length}")
    return bytes(out)


def nbd_data_read(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """Alias of :func:`guest_read` for a qcow2 *path* (guest view of the data)."""
    return guest_read(path, offset, length)


# ---------------------------------------------------------------------------
# Background processes
# ---------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - safety net
    for proc in list(_LIVE):
        _terminate(proc, sig=signal.SIGKILL, timeout=5)


def _terminate(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    """Send *sig* to *proc* (if alive), wait; escalate to SIGKILL on timeout."""
    try:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode
    finally:
        _LIVE.discard(proc)


def _spawn(argv: Sequence[str | os.PathLike], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    _LIVE.add(proc)
    return proc


def _read_log(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


def _nbd_probe(sock_path: str, timeout: float = 2.0) -> bool:
    """True if an NBD server answers on *sock_path* with a newstyle greeting.

    The server sends its greeting only from its main loop, i.e. after start-up
    has finished. The probe then aborts politely (NBD_OPT_ABORT) so the server
    does not log a negotiation failure.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            greeting = b""
            while len(greeting) < 18:
                chunk = s.recv(18 - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
            if greeting[:8] != _NBD_MAGIC:
                return False
            s.sendall(struct.pack(">I", _NBD_FLAG_C_FIXED_NEWSTYLE))
            s.sendall(_NBD_IHAVEOPT + struct.pack(">II", _NBD_OPT_ABORT, 0))
            try:
                s.recv(64)
            except OSError:
                pass
            return True
    except OSError:
        return False


def _wait_until(pred, proc: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise QemuError(
                f"{what} exited with {proc.returncode} during start-up:\n{_tail(_read_log(log))}"
            )
        if pred():
            return
        if time.monotonic() > deadline:
            _terminate(proc, sig=signal.SIGKILL)
            raise QemuError(f"{what} not ready after {timeout}s:\n{_tail(_read_log(log))}")
        time.sleep(0.02)


def _tmp_root() -> str:
    # /tmp rather than $TMPDIR: UNIX socket paths must stay under 108 bytes
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def _sock_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qbm-", dir=_tmp_root()))


# ---------------------------------------------------------------------------
# NBD: qemu-nbd + nbdinfo
# ---------------------------------------------------------------------------


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort ``(start, length)`` ranges and merge overlapping/adjacent ones."""
    out: list[list[int]] = []
    for start, length in sorted(extents):
        if length <= 0:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], start + length - out[-1][0])
        else:
            out.append([start, length])
    return [(s, n) for s, n in out]


class QemuNbd:
    """``qemu-nbd`` serving *path* on a private UNIX socket (context manager).

    Runs ``qemu-nbd [-r] -t -f FMT [-B BITMAP] --socket=SOCK PATH`` in the
    background. ``-t`` (persistent) matters: without it qemu-nbd 7.2 exits
    after its first client, and the readiness probe would be that client.
    Ready = the socket answers with an NBD greeting. On exit qemu-nbd is
    stopped (SIGTERM, then SIGKILL after a timeout). Exposes :attr:`uri`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        read_only: bool = True,
        bitmap: str | None = None,
        fmt: str = "qcow2",
        timeout: float = 30.0,
    ) -> None:
        self.path = Path(path).resolve()
        self.read_only = read_only
        self.bitmap = bitmap
        self.fmt = fmt
        self.timeout = timeout
        self._dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        assert self._dir is not None
        argv = ["qemu-nbd", "-t", "-f", self.fmt]
        if self.read_only:
            argv.append("-r")
        if self.bitmap is not None:
            argv += ["-B", self.bitmap]
        return argv + [f"--socket={self._dir / 'nbd.sock'}", str(self.path)]

    @property
    def uri(self) -> str:
        assert self._dir is not None
        return f"nbd+unix:///?socket={self._dir / 'nbd.sock'}"

    def __enter__(self) -> Self:
        require_tools("qemu-nbd")
        self._dir = _sock_dir()
        sock = self._dir / "nbd.sock"
        log = self._dir / "qemu-nbd.log"
        try:
            self.proc = _spawn(self.argv(), log)
            _wait_until(
                lambda: sock.exists() and _nbd_probe(str(sock)),
                self.proc,
                "qemu-nbd",
                log,
                self.timeout,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.proc is not None:
                _terminate(self.proc)
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)


def nbd_map(
    path: str | os.PathLike,
    context: str = "base:allocation",
    *,
    bitmap: str | None = None,
    fmt: str = "qcow2",
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict]:
    """Export *path* read-only with :class:`QemuNbd` and return ``nbdinfo --json --map=CONTEXT``.

    Each element is ``{"offset": int, "length": int, "type": int,
    "description": str}`` (nbdinfo 1.14). For ``qemu:dirty-bitmap:NAME``
    type 1 is "dirty" and 0 "clean"; for ``base:allocation`` bit 0 is "hole"
    and bit 1 "zero". Raises :class:`QemuError` if qemu-nbd refuses to start
    (e.g. QEMU 7.2 on an in-use bitmap: "Bitmap 'b0' is inconsistent and
    cannot be used").
    """
    require_tools("qemu-nbd", "nbdinfo")
    with QemuNbd(path, read_only=True, bitmap=bitmap, fmt=fmt) as srv:
        res = _run(["nbdinfo", "--json", f"--map={context}", srv.uri], timeout=timeout)
        return json.loads(res.stdout)


def nbd_dirty_extents(
    path: str | os.PathLike, bitmap: str, *, fmt: str = "qcow2"
) -> list[tuple[int, int]]:
    """Dirty byte ranges of persistent *bitmap*, as QEMU exports them over NBD.

    Uses the ``qemu:dirty-bitmap:NAME`` meta context (nbdinfo type 1 =
    "dirty", 0 = "clean"); returns merged, sorted ``(start, length)`` ranges.
    Ranges are whole granules, except that the last one is cut at the
    virtual disk size.
    """
    entries = nbd_map(path, f"qemu:dirty-bitmap:{bitmap}", bitmap=bitmap, fmt=fmt)
    return merge_extents((e["offset"], e["length"]) for e in entries if e["type"] & 1)


# ---------------------------------------------------------------------------
# qemu-storage-daemon
# ---------------------------------------------------------------------------


class StorageDaemon:
    """A ``qemu-storage-daemon`` serving one qcow2 image over NBD (UNIX socket).

    Command line (QEMU 7.2)::

        qemu-storage-daemon
          --blockdev driver=file,node-name=file,filename=PATH[,read-only=on]
          --blockdev driver=qcow2,node-name=fmt,file=file[,read-only=on]
          --nbd-server addr.type=unix,addr.path=SOCK
          --export type=nbd,id=exp,node-name=fmt,name=,writable=on|off
          [--chardev socket,id=qmp0,path=QMPSOCK,server=on,wait=off
           --monitor chardev=qmp0]

    The export name is empty, so :attr:`nbd_uri` is
    ``nbd+unix:///?socket=SOCK``. Opening the qcow2 node read-write (the
    default, ``read_only=False``) marks every persistent bitmap in-use on
    disk; a clean :meth:`stop` stores them and clears in-use, :meth:`kill`
    (SIGKILL) leaves them in-use.

    Use as a context manager; on exit a still-running daemon is stopped
    cleanly (or killed if that fails). Readiness = the NBD socket answers with
    a server greeting (and the QMP socket exists, if enabled).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        writable: bool = True,
        read_only: bool = False,
        qmp: bool = False,
        fmt: str = "qcow2",
        extra_args: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> None:
        self.path = Path(path).resolve()
        self.read_only = read_only
        self.writable = writable and not read_only
        self.fmt = fmt
        self.timeout = timeout
        # created by start() (mkdir 0700, must not exist), removed by close()
        self._dir = Path(_tmp_root()) / f"qbm-qsd-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self._output = ""
        self.sock = self._dir / "nbd.sock"
        self.qmp_sock = self._dir / "qmp.sock" if qmp else None
        self.log = self._dir / "qsd.log"
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    # -- life cycle ---------------------------------------------------------

    def argv(self) -> list[str]:
        """The exact qemu-storage-daemon command line used."""
        ro = ",read-only=on" if self.read_only else ""
        argv = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=file,filename={self.path}{ro}",
            "--blockdev",
            f"driver={self.fmt},node-name=fmt,file=file{ro}",
            "--nbd-server",
            f"addr.type=unix,addr.path={self.sock}",
            "--export",
            f"type=nbd,id=exp,node-name=fmt,name=,writable={'on' if self.writable else 'off'}",
        ]
        if self.qmp_sock is not None:
            argv += [
                "--chardev",
                f"socket,id=qmp0,path={self.qmp_sock},server=on,wait=off",
                "--monitor",
                "chardev=qmp0",
            ]
        return argv + self.extra_args

    def start(self) -> Self:
        """Start the daemon and wait until its NBD server answers."""
        require_tools("qemu-storage-daemon", "qemu-io")
        if self.proc is not None:
            raise QemuError("storage daemon already started")
        if "," in str(self.path):
            raise ValueError("image path must not contain ',' (QEMU option syntax)")
        self._dir.mkdir(mode=0o700)

        def ready() -> bool:
            if self.qmp_sock is not None and not self.qmp_sock.exists():
                return False
            return self.sock.exists() and _nbd_probe(str(self.sock))

        try:
            self.proc = _spawn(self.argv(), self.log)
            _wait_until(ready, self.proc, "qemu-storage-daemon", self.log, self.timeout)
        except BaseException:
            # start-up failed: nothing may be left behind (process, socket dir)
            if self.proc is not None:
                _terminate(self.proc, sig=signal.SIGKILL)
            self._output = _read_log(self.log)
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemon cleanly if it still runs (SIGKILL if that fails)
        and remove its socket directory. Safe to call more than once."""
        try:
            if self.running:
                try:
                    self.stop()
                except QemuError:
                    self.kill()
        finally:
            self._output = _read_log(self.log) or self._output
            shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def nbd_uri(self) -> str:
        """``nbd+unix:///?socket=SOCK`` (empty export name)."""
        return f"nbd+unix:///?socket={self.sock}"

    def output(self) -> str:
        """Everything the daemon printed so far (stdout and stderr); still
        available after :meth:`close`."""
        return _read_log(self.log) or self._output

    def kill(self) -> None:
        """SIGKILL the daemon and reap it: a crash, bitmaps stay in-use."""
        if self.proc is not None:
            _terminate(self.proc, sig=signal.SIGKILL, timeout=10)

    def stop(self, timeout: float | None = None) -> None:
        """Clean shutdown (SIGTERM, wait): bitmaps are stored, in-use cleared.

        Raises :class:`QemuError` if the daemon does not exit 0 in time.
        """
        if self.proc is None:
            return
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout or self.timeout)
            except subprocess.TimeoutExpired:
                _terminate(proc, sig=signal.SIGKILL)
                raise QemuError(
                    f"storage daemon ignored SIGTERM for {timeout or self.timeout}s"
                ) from None
        _LIVE.discard(proc)
        if proc.returncode != 0:
            raise QemuError(
                f"storage daemon exited with {proc.returncode}:\n{_tail(self.output())}"
            )

    # -- I/O through NBD ----------------------------------------------------

    def _need_running(self) -> None:
        if not self.running:
            raise QemuError("storage daemon is not running:\n" + _tail(self.output()))

    def write(self, offset: int, length: int, pattern: int = 0xCD) -> None:
        """Write *length* bytes of *pattern* at guest *offset* through NBD."""
        self.writes([(offset, length)], pattern=pattern)

    def writes(
        self, extents: Iterable[tuple[int, int]], *, pattern: int = 0xCD, flush: bool = False
    ) -> None:
        """Write many extents through NBD with one ``qemu-io -f raw NBD_URI`` process."""
        self._need_running()
        cmds = [f"write -q -P 0x{pattern:02x} {int(o)} {int(n)}" for o, n in extents]
        if flush:
            cmds.append("flush")
        qemu_io(self.nbd_uri, *cmds, fmt="raw")

    def read(self, offset: int, length: int) -> bytes:
        """Read guest bytes through NBD."""
        self._need_running()
        return guest_read(self.nbd_uri, offset, length, fmt="raw")

    def flush(self) -> None:
        """NBD_CMD_FLUSH: the daemon flushes the qcow2 node (data and metadata
        caches) to the file. Bitmaps are NOT stored by a flush."""
        self._need_running()
        qemu_io(self.nbd_uri, "flush", fmt="raw")

    # -- QMP ----------------------------------------------------------------

    def qmp(self, cmd: str, **args) -> object:
        """Run one QMP command and return its ``"return"`` value.

        Needs ``StorageDaemon(..., qmp=True)``. Argument names use QMP's
        spelling; pass dashes via ``**{"node-name": ...}`` where needed, e.g.
        ``d.qmp("block-dirty-bitmap-add", node="fmt", name="b1",
        persistent=True, granularity=65536)``. Raises :class:`QemuError` on
        an ``"error"`` answer.
        """
        if self.qmp_sock is None:
            raise QemuError("StorageDaemon was started without qmp=True")
        self._need_running()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.qmp_sock))
            f = s.makefile("rwb")

            def recv() -> dict:
                while True:
                    line = f.readline()
                    if not line:
                        raise QemuError("QMP connection closed:\n" + _tail(self.output()))
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg

            def send(execute: str, arguments: dict | None = None) -> object:
                req: dict = {"execute": execute}
                if arguments:
                    req["arguments"] = arguments
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                ans = recv()
                if "error" in ans:
                    raise QemuError(f"QMP {execute} failed: {ans['error']}")
                return ans.get("return")

            greeting = recv()
            if "QMP" not in greeting:
                raise QemuError(f"unexpected QMP greeting: {greeting}")
            send("qmp_capabilities")
            return send(cmd, args)


def crash_image(
    path: str | os.PathLike,
    writes: Iterable[tuple[int, int]],
    *,
    bitmaps: Sequence[str] = ("b0",),
    pattern: int = 0x5A,
) -> None:
    """Leave *path* exactly as a crashed QEMU writer would.

    Recipe: any bitmap in *bitmaps* that the image lacks is first added with
    ``qemu-img bitmap --add`` (64 KiB granularity); then a read-write
    qemu-storage-daemon is started, the *writes* go through NBD, the export is
    flushed, and the daemon is SIGKILLed. Afterwards every bitmap in
    *bitmaps* is verified to be "in-use" (raises :class:`QemuError` if not).
    QEMU 7.2 stores nothing at that point: the on-disk bitmap data is what it
    was before the daemon started, and the writes are missing from it.
    """
    existing = img_bitmaps(path)
    for name in bitmaps:
        if name not in existing:
            add_bitmap(path, name)
    d = StorageDaemon(path, writable=True)
    try:
        d.start()
        extents = list(writes)
        if extents:
            d.writes(extents, pattern=pattern, flush=True)
        else:
            d.flush()
        d.kill()
    finally:
        d.close()
    after = img_bitmaps(path)
    bad = [n for n in bitmaps if "in-use" not in after.get(n, {}).get("flags", [])]
    if bad:
        raise QemuError(
            f"after SIGKILL these bitmaps are not in-use: {bad}; qemu-img info says {after}"
        )


# ---------------------------------------------------------------------------
# Lock bytes
# ---------------------------------------------------------------------------

_FLOCK = (
    "@hhqqi0q"  # struct flock: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid (+pad)
)


def lock_bytes_held(path: str | os.PathLike, byte_range: Iterable[int] = LOCK_BYTES) -> set[int]:
    """Return the lock bytes of *path* that another open file description locks.

    For each byte, from a fresh read-only fd, ask ``F_OFD_GETLK`` whether an
    exclusive ``F_WRLCK`` could be taken; a conflicting lock (QEMU holds
    ``F_RDLCK`` OFD locks) means the byte is held. Bytes 100..104 and
    200..204 by default (:data:`LOCK_BYTES`).
    """
    getlk = getattr(fcntl, "F_OFD_GETLK", 36)  # 36 on Linux
    held: set[int] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        for b in byte_range:
            arg = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, b, 1, 0)
            res = fcntl.fcntl(fd, getlk, arg)
            l_type = struct.unpack(_FLOCK, res)[0]
            if l_type != fcntl.F_UNLCK:
                held.add(b)
    finally:
        os.close(fd)
    return held


# ---------------------------------------------------------------------------
# Raw header access (pure Python, for tests that edit images by hand)
# ---------------------------------------------------------------------------


def _header(path: str | os.PathLike) -> tuple[bytes, int, int, int]:
    with open(path, "rb") as f:
        head = f.read(72)
        if len(head) < 72 or head[:4] != b"QFI\xfb":
            raise ValueError(f"{path}: not a qcow2 image")
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        f.seek(0)
        cluster = f.read(1 << cluster_bits)
    version = struct.unpack_from(">I", cluster, 4)[0]
    hlen = struct.unpack_from(">I", cluster, 100)[0] if version >= 3 else 72
    backing_off = struct.unpack_from(">Q", cluster, 8)[0]
    end = backing_off or len(cluster)
    return cluster, version, hlen, end


def header_extensions(path: str | os.PathLike) -> list[tuple[int, int, bytes]]:
    """List the header extensions of a qcow2 image: ``[(file_offset, magic, data)]``.

    Walks from ``header_length`` in 8-byte-aligned steps up to the end marker
    (type 0), the backing file name or the end of cluster 0.
    """
    cluster, _version, off, end = _header(path)
    exts = []
    while off + 8 <= end:
        magic, length = struct.unpack_from(">II", cluster, off)
        if magic == 0:
            break
        exts.append((off, magic, cluster[off + 8 : off + 8 + length]))
        off += 8 + ((length + 7) & ~7)
    return exts


def append_header_extension(path: str | os.PathLike, magic: int, data: bytes) -> None:
    """Insert a header extension just before the end marker (in place).

    Only for images without a backing file name after the extensions (raises
    ``ValueError`` if it would not fit before the backing name / cluster end).
    """
    _cluster, _version, hlen, end = _header(path)
    exts = header_extensions(path)
    off = hlen
    if exts:
        last_off, _m, last_data = exts[-1]
        off = last_off + 8 + ((len(last_data) + 7) & ~7)
    blob = (
        struct.pack(">II", magic, len(data))
        + data
        + b"\0" * (-len(data) % 8)
        + struct.pack(">II", 0, 0)
    )
    if off + len(blob) > end:
        raise ValueError("extension does not fit in the header area")
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(blob)


def read_autoclear(path: str | os.PathLike) -> int:
    """The ``autoclear_features`` word (0 for a version 2 image)."""
    cluster, version, _hlen, _end = _header(path)
    return struct.unpack_from(">Q", cluster, 88)[0] if version >= 3 else 0


def set_autoclear_bits(path: str | os.PathLike, mask: int) -> None:
    """OR *mask* into ``autoclear_features`` (bytes 88-95) in place (v3 only)."""
    _cluster, version, _hlen, _end = _header(path)
    if version < 3:
        raise ValueError("version 2 images have no autoclear field")
    with open(path, "r+b") as f:
        f.seek(88)
        value = struct.unpack(">Q", f.read(8))[0] | mask
        f.seek(88)
        f.write(struct.pack(">Q", value))


_BITMAPS_EXT = 0x23852875


def bitmap_directory(path: str | os.PathLike) -> list[dict]:
    """Parse the bitmap directory by hand (independent of qbitmap).

    Returns one dict per entry: ``entry_offset`` (file offset of the entry),
    ``name`` (str), ``table_offset``, ``table_size``, ``flags`` (bit 0
    in_use, bit 1 auto), ``type``, ``granularity_bits``, ``extra_data_size``.
    """
    ext = [d for _o, m, d in header_extensions(path) if m == _BITMAPS_EXT]
    if not ext:
        return []
    nb, _res, dir_size, dir_off = struct.unpack(">IIQQ", ext[0][:24])
    with open(path, "rb") as f:
        f.seek(dir_off)
        raw = f.read(dir_size)
    out, pos = [], 0
    for _ in range(nb):
        tbl, tsize, flags, typ, gbits, nsize, xsize = struct.unpack_from(">QIIBBHI", raw, pos)
        name_at = pos + 24 + xsize
        out.append(
            {
                "entry_offset": dir_off + pos,
                "name": raw[name_at : name_at + nsize].decode("utf-8", "replace"),
                "table_offset": tbl,
                "table_size": tsize,
                "flags": flags,
                "type": typ,
                "granularity_bits": gbits,
                "extra_data_size": xsize,
            }
        )
        pos += (24 + xsize + nsize + 7) & ~7
    return out


def edit_bitmap_flags(
    path: str | os.PathLike, name: str, *, set_mask: int = 0, clear_mask: int = 0
) -> int:
    """Change the ``flags`` word of bitmap *name*'s directory entry in place.

    Test-only surgery (e.g. clear in_use, bit 0, to let QEMU export the stale
    on-disk data of a crashed bitmap). Returns the new flags.
    """
    for e in bitmap_directory(path):
        if e["name"] == name:
            flags = (e["flags"] | set_mask) & ~clear_mask
            with open(path, "r+b") as f:
                f.seek(e["entry_offset"] + 12)
                f.write(struct.pack(">I", flags))
            return flags
    raise KeyError(name)


# ---------------------------------------------------------------------------
# Golden fixtures
# ---------------------------------------------------------------------------


def golden_image(name: str, dest_dir: str | os.PathLike) -> Path:
    """Unpack ``tests/fixtures/golden/NAME.gz`` into *dest_dir*; return the path.

    *name* is e.g. ``"sample.qcow2"``. Each call makes a fresh writable copy.
    """
    src = GOLDEN_DIR / f"{name}.gz"
    dest = Path(dest_dir) / name
    with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return dest
