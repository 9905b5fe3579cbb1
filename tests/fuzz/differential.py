"""Differential fuzzing of qbitmap against QEMU: the oracle, the properties, the runner.

For every mutant (``mutants.py``) this module asks QEMU 7.2 what it thinks of
the image -- ``qemu-img check --output=json``, ``qemu-img info --output=json``
(the bitmaps QEMU accepts) and a read-write open by ``qemu-io -c quit`` on a
copy, which loads every bitmap (setting in_use in place) and stores them
again when it closes (see docs/qemu-facts.md, section f) -- and then runs
qbitmap on it: ``check`` in-process through the public API, and ``recover
--mode full``, once without and once with ``--drop-broken``, each on its
own copy.  A sample of the mutants goes through the real command line
instead (``qbitmap check`` or ``check --json``, ``dump --json``,
``recover``).  Every qbitmap run is bounded: a forked child (or a
subprocess) under ``RLIMIT_AS``, ``RLIMIT_CPU`` and a wall-clock timeout.

QEMU's verdict on an image is, in this order:

* ``refuses`` -- ``qemu-img info`` or the read-write open fails;
* ``errors``  -- ``qemu-img check`` exits 1 or 2 or reports corruptions or
  check errors, or the read-write session prints an error (QEMU marks the
  image corrupt, fails to free clusters, loses bitmaps at close...);
* ``leaks``   -- ``qemu-img check`` exits 3;
* ``clean``   -- ``qemu-img check`` exits 0.

The properties are those of issue 8, "Tests that would have caught these",
plus two from its item 2 (a refusal changes no byte; a write into an image
QEMU does not accept makes nothing worse); they are listed in
:data:`PROPERTIES`.  :func:`evaluate` decides them from the observations
alone, so they are unit-tested without QEMU.  Guest data is compared only
where QEMU can read all of the mutant's own guest data (``qemu-img compare``
of the mutant with a copy of itself exits 0): elsewhere there is nothing to
compare against.  ``scripts/fuzz --help`` describes the command that runs
thousands of mutants.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bases
import mutants

#: CPU seconds one qbitmap operation (check, recover) may use on these images of at most a few
#: MiB.  In 6000 mutants every run used under 0.3 s except leak reclaims of huge refcounts
#: (docs/fuzz-findings.md, C7).  CPU time, not wall time, so that the verdict does not depend
#: on how busy the machine is (RLIMIT_CPU; SIGXCPU ends the run).
QBITMAP_CPU_SECONDS = 4.0
#: Wall-clock seconds after which a run that is not using CPU (blocked) is killed.
QBITMAP_TIMEOUT = 60.0
#: CPU seconds a fresh ``qbitmap`` process may spend starting up, on top of the above.
CLI_STARTUP_CPU_SECONDS = 2.0
#: Address space a qbitmap run may add to what the process already maps (RLIMIT_AS).
MEMORY_HEADROOM = 1 << 30
#: Seconds one QEMU tool may take before the oracle gives up on the mutant.
QEMU_TIMEOUT = 60.0
#: One mutant in this many (by a hash of its id) also goes through qbitmap's command line.
CLI_EVERY = 8

VERDICTS = ("clean", "leaks", "errors", "refuses")
_VERDICT_RANK = {v: i for i, v in enumerate(VERDICTS)}

#: Lines a tool may print on stderr without it counting as an error: QEMU ignoring a bitmaps
#: extension whose autoclear bit 0 is clear (it accepts the image), and the leak repair a
#: read-write open runs on an image with the dirty bit set (lazy refcounts).
BENIGN_STDERR = (
    "a program lacking bitmap support modified this file",
    "Some clusters may be leaked, run 'qemu-img check -r'",
    "Leaked cluster ",
    "Repairing cluster ",
)

#: What qemu-io says when an encrypted image is opened without ``--object secret``.
_NEEDS_KEY = "'encrypt.key-secret' is required"
#: What QEMU says of a file without the qcow2 magic: not a qcow2 image at all, which check
#: cannot judge (exit 1, documented), rather than a qcow2 image it would refuse (exit 2).
_NOT_QCOW2 = "Image is not in qcow2 format"

CHECK_EXIT_CODES = frozenset({0, 1, 2, 3, 4, 64, 75})
RECOVER_EXIT_CODES = frozenset({0, 1, 2, 64, 75})
DUMP_EXIT_CODES = frozenset({0, 1, 64})

PROPERTIES: dict[str, str] = {
    "no-crash": "no traceback: in-process only qbitmap's documented exceptions; on the command "
    "line no 'Traceback' or 'internal error' on stderr and a documented exit status",
    "bounded": f"every qbitmap run uses at most {QBITMAP_CPU_SECONDS:g} s of CPU time, ends within "
    f"{QBITMAP_TIMEOUT:g} s and within {MEMORY_HEADROOM >> 20} MiB of extra address space",
    "rejected-exits-2": "QEMU reports errors or refuses to open the image => check exits 2 "
    "(1 when QEMU says the file is not in qcow2 format: it lacks the qcow2 magic)",
    "usable-opens-rw": "check exits 0, 3 or 4 => QEMU opens the image read-write",
    "in-use-not-ok": "QEMU accepts the image and lists a bitmap flagged in-use => check exits 2 "
    "or 4, never 0 or 3 (an in-use bitmap cannot serve an incremental backup)",
    "leaks-not-ok": "qemu-img check reports leaked clusters => check does not exit 0",
    "recovered-opens-rw": "after recover on an image QEMU accepted: QEMU opens it read-write "
    "(and stores its bitmaps at close without an error)",
    "recovered-check-clean": "after recover on an image QEMU accepted: qemu-img check reports "
    "no errors",
    "recovered-same-data": "after recover on an image QEMU accepted: guest data byte-identical "
    "(qemu-img compare)",
    "recovered-keeps-bitmaps": "after recover on an image QEMU accepted: every bitmap QEMU "
    "listed before is still listed (but --drop-broken may drop an in-use bitmap of a disk of 0 "
    "bytes: it holds no bit, and QEMU accepts no table for it)",
    "refusal-changes-nothing": "recover refuses (exit 2) => no byte of the image changed",
    "never-worse": "recover on an image QEMU does not accept: if it wrote anything, QEMU's "
    "verdict is no worse and the guest data is byte-identical",
    "cli-agrees": "qbitmap check on the command line exits as the library's report says",
    "ok-needs-no-repair": "check exits 0 => recover --mode full (with or without --drop-broken) "
    "writes nothing: exit 0 says there is nothing to repair",
}


# ---------------------------------------------------------------------------------------------
# Observations (plain data: picklable, JSON-able, and what the properties are decided from)
# ---------------------------------------------------------------------------------------------


@dataclass
class QemuView:
    """What QEMU says about one image."""

    verdict: str  # one of VERDICTS, or "timeout"
    reason: str  # the first line that decided the verdict ("" when clean)
    check_rc: int | None = None
    check: dict[str, Any] = field(default_factory=dict)
    info_ok: bool = False
    bitmaps: list[str] = field(default_factory=list)  # names, in directory order
    in_use: list[str] = field(default_factory=list)  # names of those flagged in-use
    virtual_size: int | None = None  # the disk's size in bytes, as qemu-img info reads it
    rw_rc: int | None = None
    rw_errors: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.verdict in ("clean", "leaks")

    def droppable(self, name: str) -> bool:
        """A bitmap ``--drop-broken`` may drop although QEMU lists it: nothing is lost.

        An in-use bitmap of a disk of 0 bytes holds no bit, and QEMU accepts no bitmap table
        for such a disk (a table of 0 entries "doesn't satisfy the constraints"), so no
        recovery can ever bring it back into service (class C12 of docs/fuzz-findings.md).
        """
        return self.virtual_size == 0 and name in self.in_use

    @property
    def needs_key(self) -> bool:
        """QEMU refuses only for want of the encryption key, which the oracle never has.

        Not corruption: the bitmaps are not encrypted, and with ``--object secret`` QEMU would
        open the image; so rejected-exits-2 and usable-opens-rw do not apply.
        """
        return self.verdict == "refuses" and self.info_ok and _NEEDS_KEY in self.reason


@dataclass
class Run:
    """One bounded qbitmap run, in-process (forked child) or on the command line."""

    how: str  # "api" or "cli"
    kind: str  # "ok" | "error" (documented) | "crash" | "timeout" | "memory" | "signal"
    exit_code: int | None = None
    seconds: float = 0.0
    detail: str = ""  # exception type and message, or the stderr line that matters
    where: str = ""  # for a crash: the innermost qbitmap frame, file:function
    result: dict[str, Any] = field(default_factory=dict)
    cpu: float = 0.0  # CPU seconds (user + system) of the run


@dataclass
class RecoverObs:
    drop_broken: bool
    run: Run
    changed: bool = False
    after: QemuView | None = None
    compare_rc: int | None = None
    compare_msg: str = ""
    # qemu-img compare of the mutant with an untouched copy of itself: 0 when QEMU can read all
    # of its guest data, so that a comparison with the recovered image means something
    baseline_rc: int | None = None


@dataclass
class Observation:
    mutant: str
    edits: list[str]
    operators: list[str]
    qemu: QemuView
    check: Run
    cli: list[tuple[str, Run]] = field(default_factory=list)  # (argv summary, run)
    recover: list[RecoverObs] = field(default_factory=list)
    harness_error: str = ""


@dataclass
class Failure:
    property: str
    detail: str
    signature: str  # what several instances of one class share (used to group them)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def _run_failures(label: str, run: Run, documented: frozenset[int]) -> list[Failure]:
    out = []
    if run.kind == "crash":
        out.append(
            Failure(
                "no-crash", f"{label}: {run.detail}", f"{run.detail.split(':')[0]} @ {run.where}"
            )
        )
    elif run.kind in ("timeout", "memory", "signal"):
        out.append(
            Failure(
                "bounded", f"{label}: {run.kind} {run.detail}", f"{label.split()[0]} {run.kind}"
            )
        )
    elif run.exit_code is not None and run.exit_code not in documented:
        out.append(
            Failure(
                "no-crash",
                f"{label}: undocumented exit status {run.exit_code}",
                f"exit {run.exit_code}",
            )
        )
    return out


def evaluate(obs: Observation) -> list[Failure]:
    """Decide every property of :data:`PROPERTIES` for one mutant."""
    fails: list[Failure] = []
    q = obs.qemu
    fails += _run_failures("check", obs.check, CHECK_EXIT_CODES)
    for argv, run in obs.cli:
        documented = (
            DUMP_EXIT_CODES
            if argv.startswith("dump")
            else (RECOVER_EXIT_CODES if argv.startswith("recover") else CHECK_EXIT_CODES)
        )
        fails += _run_failures(f"qbitmap {argv}", run, documented)
        if (
            argv.startswith("check")
            and run.kind in ("ok", "error")
            and obs.check.kind in ("ok", "error")
            and run.exit_code != obs.check.exit_code
        ):
            fails.append(
                Failure(
                    "cli-agrees",
                    f"qbitmap {argv} exited {run.exit_code}, the library's report says "
                    f"{obs.check.exit_code}",
                    f"cli {run.exit_code} vs api {obs.check.exit_code}",
                )
            )
    # a documented exception from check_path is what the command line would exit with
    code = obs.check.exit_code if obs.check.kind in ("ok", "error") else None
    expected = 1 if q.verdict == "refuses" and _NOT_QCOW2 in q.reason else 2
    if (
        q.verdict in ("errors", "refuses")
        and not q.needs_key
        and code is not None
        and code != expected
    ):
        fails.append(
            Failure(
                "rejected-exits-2",
                f"QEMU {q.verdict} ({q.reason}); qbitmap check exits {code}"
                + _findings_note(obs.check),
                f"QEMU {q.verdict}: {normalise(q.reason)} / check {code}",
            )
        )
    if code in (0, 3, 4) and q.verdict == "refuses" and not q.needs_key:
        fails.append(
            Failure(
                "usable-opens-rw",
                f"qbitmap check exits {code} but QEMU refuses the image: {q.reason}",
                f"QEMU refuses: {normalise(q.reason)} / check {code}",
            )
        )
    if q.accepted and q.in_use and code in (0, 3):
        fails.append(
            Failure(
                "in-use-not-ok",
                f"QEMU lists in-use bitmaps {q.in_use!r}; qbitmap check exits {code}"
                + _findings_note(obs.check),
                f"QEMU in-use / check {code}",
            )
        )
    if q.check_rc == 3 and code == 0:
        fails.append(
            Failure(
                "leaks-not-ok",
                f"qemu-img check reports leaks ({q.reason or q.check.get('leaks')}); qbitmap check "
                "exits 0" + _findings_note(obs.check),
                "QEMU leaks / check 0",
            )
        )
    for r in obs.recover:
        label = "recover --mode full" + (" --drop-broken" if r.drop_broken else "")
        fails += _run_failures(label, r.run, RECOVER_EXIT_CODES)
        if code == 0 and r.changed:
            fails.append(
                Failure(
                    "ok-needs-no-repair",
                    f"qbitmap check exits 0, yet {label} changed the image ({_recover_note(r)})",
                    f"check 0 / {label} wrote",
                )
            )
        refused = r.run.kind == "error" and r.run.exit_code == 2
        if refused and r.changed:
            fails.append(
                Failure(
                    "refusal-changes-nothing",
                    f"{label} refused ({r.run.detail}) but changed the image",
                    f"{label} refused and wrote",
                )
            )
        if not r.changed or r.after is None:
            continue
        a = r.after
        what = _recover_note(r)
        if q.accepted:
            if a.verdict in ("refuses", "timeout") or a.rw_errors:
                fails.append(
                    Failure(
                        "recovered-opens-rw",
                        f"{label} ({what}): QEMU then says {a.verdict}: {a.reason}",
                        f"{label}: QEMU {a.verdict}: {normalise(a.reason)}",
                    )
                )
            if (
                a.check_rc not in (0, 3)
                or a.check.get("corruptions")
                or a.check.get("check-errors")
            ):
                fails.append(
                    Failure(
                        "recovered-check-clean",
                        f"{label} ({what}): qemu-img check exits {a.check_rc}: {a.reason}",
                        f"{label}: qemu-img check {a.check_rc}: {normalise(a.reason)}",
                    )
                )
            if r.baseline_rc == 0 and r.compare_rc != 0:
                fails.append(
                    Failure(
                        "recovered-same-data",
                        f"{label} ({what}): qemu-img compare exits {r.compare_rc}: {r.compare_msg}",
                        f"{label}: compare {r.compare_rc}",
                    )
                )
            gone = [
                n
                for n in q.bitmaps
                if n not in a.bitmaps and not (r.drop_broken and q.droppable(n))
            ]
            if gone:
                fails.append(
                    Failure(
                        "recovered-keeps-bitmaps",
                        f"{label} ({what}): bitmaps QEMU listed before are gone: {gone!r}",
                        f"{label}: bitmap vanished",
                    )
                )
        else:
            worse = a.verdict == "timeout" or (
                q.verdict != "timeout" and _VERDICT_RANK[a.verdict] > _VERDICT_RANK[q.verdict]
            )
            if worse:
                fails.append(
                    Failure(
                        "never-worse",
                        f"{label} ({what}) wrote into an image QEMU said '{q.verdict}' about "
                        f"({q.reason}); now QEMU says {a.verdict}: {a.reason}",
                        f"{label}: QEMU {q.verdict} -> {a.verdict}",
                    )
                )
            # only where QEMU can read all of the mutant's guest data (else there is no baseline)
            if r.baseline_rc == 0 and r.compare_rc != 0:
                fails.append(
                    Failure(
                        "never-worse",
                        f"{label} ({what}) wrote into an image QEMU said '{q.verdict}' about "
                        f"({q.reason}); guest data changed: qemu-img compare exits "
                        f"{r.compare_rc}: {r.compare_msg}",
                        f"{label}: QEMU {q.verdict}, guest data changed",
                    )
                )
    return fails


def _findings_note(run: Run) -> str:
    codes = run.result.get("codes") or []
    return f" (findings: {', '.join(codes)})" if codes else " (no findings)"


def _recover_note(r: RecoverObs) -> str:
    res = r.run.result
    if r.run.how == "cli":
        return f"exit {r.run.exit_code}" + (f": {r.run.detail}" if r.run.detail else "")
    if r.run.kind != "ok":
        return f"{r.run.kind} (exit {r.run.exit_code}): {r.run.detail}"
    acts = ", ".join(f"{n} {a}" for n, a in res.get("bitmaps", []))
    return f"status {res.get('status')}" + (f": {acts}" if acts else "")


_NORMALISE = [
    (re.compile(r"(?<!\w)'[^']*'"), "'…'"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "N"),
    (re.compile(r"\b[0-9a-f]*\d[0-9a-f]*\b"), "N"),
    (re.compile(r"/\S+"), "PATH"),
]


def normalise(text: str) -> str:
    """A QEMU message without paths, names and numbers, to group instances of one class."""
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return text[:120]


# ---------------------------------------------------------------------------------------------
# QEMU, the oracle
# ---------------------------------------------------------------------------------------------


def _tool(argv: Sequence[str], timeout: float = QEMU_TIMEOUT) -> subprocess.CompletedProcess:
    # bytes, not text: QEMU quotes bitmap names, which may be any bytes in a mutant
    return subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )


def _lines(raw: bytes, *paths: Path) -> list[str]:
    """Non-empty lines of a tool's output, with the scratch file names replaced by IMAGE."""
    text = raw.decode("utf-8", "backslashreplace")
    for p in paths:
        text = text.replace(str(p), "IMAGE")
    # QEMU ends this warning without a newline; the next message follows on the same line
    text = text.replace("on the image file to fix.", "on the image file to fix.\n")
    return [l.strip() for l in text.splitlines() if l.strip()]


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if not any(b in line for b in BENIGN_STDERR)]


def copy_image(src: Path, dest: Path) -> None:
    """Copy an image, keeping holes (recover may grow a file sparsely)."""
    if src.stat().st_size > 64 << 20:
        subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    else:
        shutil.copyfile(src, dest)


def qemu_view(path: Path, scratch: Path) -> QemuView:
    """Ask QEMU about *path* (never modified): check, info, and a read-write open of a copy."""
    try:
        ck = _tool(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)])
        info = _tool(["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)])
        rw_copy = scratch / "rw-open.qcow2"
        copy_image(path, rw_copy)
        try:
            rw = _tool(["qemu-io", "-f", "qcow2", str(rw_copy), "-c", "quit"])
        finally:
            rw_copy.unlink(missing_ok=True)
    except subprocess.TimeoutExpired as exc:
        return QemuView("timeout", f"{exc.cmd[0]} {exc.cmd[1]} timed out")
    view = QemuView("clean", "", check_rc=ck.returncode, rw_rc=rw.returncode)
    try:
        view.check = json.loads(ck.stdout) if ck.stdout.strip() else {}
    except json.JSONDecodeError:
        view.check = {}
    view.info_ok = info.returncode == 0
    if view.info_ok:
        described = json.loads(info.stdout)
        view.virtual_size = described.get("virtual-size")
        data = described.get("format-specific", {}).get("data", {})
        view.bitmaps = [b["name"] for b in data.get("bitmaps", [])]
        view.in_use = [b["name"] for b in data.get("bitmaps", []) if "in-use" in b.get("flags", [])]
    view.rw_errors = _errors(_lines(rw.stderr, rw_copy))
    if not view.info_ok:
        view.verdict = "refuses"
        view.reason = (_errors(_lines(info.stderr, path)) or ["qemu-img info failed"])[0]
    elif rw.returncode != 0:
        view.verdict = "refuses"
        view.reason = (view.rw_errors or [f"qemu-io exited {rw.returncode}"])[0]
    elif (
        ck.returncode in (1, 2)
        or view.check.get("corruptions")
        or view.check.get("check-errors")
        or ck.returncode not in (0, 3)
    ):
        ck_lines = _errors(_lines(ck.stderr, path))
        errs = [x for x in ck_lines if "ERROR" in x or "Could not" in x or "failed" in x]
        view.verdict = "errors"
        view.reason = (errs or ck_lines or [f"qemu-img check exited {ck.returncode}"])[0]
    elif view.rw_errors:
        view.verdict, view.reason = "errors", view.rw_errors[0]
    elif ck.returncode == 3:
        view.verdict = "leaks"
        view.reason = f"{view.check.get('leaks', '?')} leaked clusters"
    return view


def qemu_compare(a: Path, b: Path) -> tuple[int | None, str]:
    try:
        proc = _tool(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)])
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return proc.returncode, " ".join(_lines(proc.stdout + proc.stderr, a, b))[:300]


# ---------------------------------------------------------------------------------------------
# qbitmap, bounded
# ---------------------------------------------------------------------------------------------


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _innermost_qbitmap_frame(tb: Any) -> str:
    frames = [f for f in traceback.extract_tb(tb) if "/qbitmap/" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    rel = f.filename[f.filename.rindex("/qbitmap/") + 1 :]
    return f"{rel}:{f.name}"


def bounded_call(
    fn: Callable[..., dict[str, Any]],
    *args: Any,
    cpu: float = QBITMAP_CPU_SECONDS,
    timeout: float = QBITMAP_TIMEOUT,
) -> Run:
    """Run ``fn(*args)`` in a forked child under RLIMIT_AS, RLIMIT_CPU and a wall-clock timeout.

    A ``QbitmapError`` is a documented outcome (kind "error", its exit code);
    any other exception is a crash; MemoryError, a signal (SIGXCPU when the
    CPU limit is hit) or the timeout say the run was not bounded.
    """
    limit = _vm_size() + MEMORY_HEADROOM
    rfd, wfd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            # RLIMIT_CPU counts whole seconds from the fork; the child has used a few ms so far
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(used.ru_utime + used.ru_stime) + math.ceil(cpu)
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
            from qbitmap.errors import QbitmapError

            try:
                payload = ("ok", fn(*args), None, "")
            except QbitmapError as exc:
                payload = ("error", {}, int(exc.exit_code), f"{type(exc).__name__}: {exc}")
            except MemoryError as exc:
                payload = ("memory", {}, None, f"{type(exc).__name__}: {exc}")
            except BaseException as exc:  # noqa: BLE001 - the point is to catch anything
                payload = (
                    "crash",
                    {},
                    _innermost_qbitmap_frame(exc.__traceback__),
                    f"{type(exc).__name__}: {exc}"[:500],
                )
            data = pickle.dumps(payload)
            with os.fdopen(wfd, "wb") as out:
                out.write(data)
        except BaseException:  # noqa: BLE001
            code = 70
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    timed_out = False
    with os.fdopen(rfd, "rb") as pipe:
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([pipe], [], [], left)
            if not ready:
                continue
            chunk = os.read(pipe.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - start
    # the child's own CPU time: a fork's counters start at zero
    run = Run("api", "ok", seconds=seconds, cpu=usage.ru_utime + usage.ru_stime)
    if timed_out:
        run.kind, run.detail = "timeout", f"still running after {timeout:g} s"
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        run.kind, run.detail = "timeout", f"more than {cpu:g} s of CPU time"
    elif os.WIFSIGNALED(status):
        run.kind, run.detail = "signal", f"killed by signal {os.WTERMSIG(status)}"
    elif not chunks:
        run.kind, run.where = "crash", "?"
        run.detail = f"child exited {os.WEXITSTATUS(status)} without a result"
    else:
        kind, result, extra, detail = pickle.loads(b"".join(chunks))
        run.kind, run.detail = kind, detail
        if kind == "ok":
            run.exit_code, run.result = result.get("exit_code"), result
        elif kind == "error":
            run.exit_code = extra
        elif kind == "crash":
            run.where = extra or "?"
    return run


def _api_check(path: str) -> dict[str, Any]:
    from qbitmap.check import Severity, check_path

    report = check_path(path)
    json.dumps(report.to_dict())  # what check --json prints must serialise
    return {
        "exit_code": report.exit_code,
        "codes": sorted({f.code for f in report.findings if f.severity >= Severity.LEAK}),
        "corrupt_codes": sorted(
            {f.code for f in report.findings if f.severity >= Severity.CORRUPT}
        ),
    }


def _api_recover(path: str, drop_broken: bool) -> dict[str, Any]:
    from qbitmap.recover import Options, recover

    report = recover(path, Options(mode="full", drop_broken=drop_broken))
    json.dumps(report.to_dict())
    return {
        "exit_code": report.exit_code,
        "status": report.status,
        "bitmaps": [(b.name, b.action) for b in report.bitmaps],
    }


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("QBITMAP_DEBUG", None)
    env.update(NO_COLOR="1", COLUMNS="100", LC_ALL="C.UTF-8")
    return env


def qbitmap_argv() -> list[str]:
    exe = Path(sys.executable).with_name("qbitmap")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "qbitmap"]


def bounded_cli(
    args: Sequence[str], cpu: float = QBITMAP_CPU_SECONDS, timeout: float = QBITMAP_TIMEOUT
) -> Run:
    """Run ``qbitmap ARGS`` under RLIMIT_AS, RLIMIT_CPU and a timeout; judge its stderr and
    exit status.  The limits add what a fresh interpreter needs before it does any work."""
    limit = MEMORY_HEADROOM + (512 << 20)  # an interpreter with numpy maps ~150 MiB at start
    soft = math.ceil(cpu + CLI_STARTUP_CPU_SECONDS)

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))

    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        proc = subprocess.run(
            [*qbitmap_argv(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=_cli_env(),
            preexec_fn=preexec,
        )
    except subprocess.TimeoutExpired:
        return Run(
            "cli",
            "timeout",
            seconds=time.monotonic() - start,
            detail=f"still running after {timeout:g} s",
        )
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode == -signal.SIGXCPU:
        return Run(
            "cli",
            "timeout",
            proc.returncode,
            seconds,
            f"more than {cpu:g} s of CPU time (plus start-up)",
            cpu=cpu_used,
        )
    err = proc.stderr.decode("utf-8", "backslashreplace")
    lines = [l for l in err.splitlines() if l.strip()]
    if proc.returncode < 0:
        return Run(
            "cli",
            "signal",
            proc.returncode,
            seconds,
            f"killed by signal {-proc.returncode}",
            cpu=cpu_used,
        )
    if "Traceback" in err or "internal error" in err:
        first = next((l for l in lines if "internal error" in l), lines[-1] if lines else "")
        if "MemoryError" in err:
            return Run("cli", "memory", proc.returncode, seconds, first[:300])
        m = re.findall(r'File ".*/(qbitmap/[^"]+)", line \d+, in (\w+)', err)
        return Run(
            "cli",
            "crash",
            proc.returncode,
            seconds,
            first[:300],
            where=f"{m[-1][0]}:{m[-1][1]}" if m else "?",
        )
    result: dict[str, Any] = {"exit_code": proc.returncode}
    if "--json" in args:
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            result["codes"] = sorted(
                {f.get("code") for f in doc.get("findings", []) if f.get("code")}
            )
    kind = (
        "ok"
        if proc.returncode in (0, 3, 4) or (args[0] == "check" and proc.returncode == 2)
        else "error"
    )
    return Run(
        "cli",
        kind,
        proc.returncode,
        seconds,
        (lines[0] if lines else "")[:300],
        result=result,
        cpu=cpu_used,
    )


# ---------------------------------------------------------------------------------------------
# One mutant
# ---------------------------------------------------------------------------------------------


def uses_cli(mid: mutants.MutantId, every: int = CLI_EVERY) -> bool:
    return every > 0 and zlib.crc32(str(mid).encode()) % every == 0


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def observe(
    mid: mutants.MutantId,
    workdir: Path,
    *,
    cli_every: int = CLI_EVERY,
    cache_dir: Path | None = None,
) -> Observation:
    """Make mutant *mid* in *workdir*, ask QEMU, run qbitmap, and record everything."""
    mutant = mutants.make(mid, cache_dir)
    return observe_image(
        str(mid),
        mutant.data,
        workdir,
        edits=mutant.edits,
        operators=mutant.operators,
        cli=uses_cli(mid, cli_every),
    )


def observe_image(
    label: str,
    data: bytes,
    workdir: Path,
    *,
    edits: Sequence[str] = (),
    operators: Sequence[str] = (),
    cli: bool = False,
) -> Observation:
    """Write *data* as an image in a scratch directory under *workdir*, ask QEMU about it,
    run qbitmap check and both recoveries (through the command line if *cli*), record all."""
    scratch = Path(tempfile.mkdtemp(prefix=label.replace(":", "-") + "-", dir=workdir))
    try:
        image = scratch / "mutant.qcow2"
        image.write_bytes(data)
        view = qemu_view(image, scratch)
        check = bounded_call(_api_check, str(image))
        check.detail = check.detail.replace(str(image), "IMAGE")
        obs = Observation(label, list(edits), list(operators), view, check)
        if cli:
            # one check run per sampled mutant: --json for half of them (by a hash of the label)
            json_flag = ["--json"] if zlib.crc32(label.encode()) & 1 else []
            for args in (["check", *json_flag, str(image)], ["dump", "--json", str(image)]):
                run = bounded_cli(args)
                run.detail = run.detail.replace(str(image), "IMAGE")
                obs.cli.append((" ".join(a if a != str(image) else "IMAGE" for a in args), run))
        for drop in (False, True):
            copy = scratch / f"recover-{int(drop)}.qcow2"
            copy_image(image, copy)
            if cli:
                args = (
                    ["recover", "--mode", "full"]
                    + (["--drop-broken"] if drop else [])
                    + [str(copy)]
                )
                run = bounded_cli(args)
                obs.cli.append((" ".join(a if a != str(copy) else "IMAGE" for a in args), run))
            else:
                run = bounded_call(_api_recover, str(copy), drop)
            run.detail = run.detail.replace(str(copy), "IMAGE")
            r = RecoverObs(drop, run)
            r.changed = not _same_file(image, copy)
            if r.changed:
                r.after = qemu_view(copy, scratch)
                if view.info_ok:
                    r.compare_rc, r.compare_msg = qemu_compare(image, copy)
                    # the baseline: can QEMU read every guest byte of the mutant at all?
                    pristine = scratch / "pristine.qcow2"
                    copy_image(image, pristine)
                    r.baseline_rc, _ = qemu_compare(image, pristine)
                    pristine.unlink()
            obs.recover.append(r)
            copy.unlink(missing_ok=True)
        return obs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reproduce_command(mid: str) -> str:
    return f"scripts/fuzz --mutant {mid}"


@dataclass
class Outcome:
    obs: Observation
    failures: list[Failure]

    def describe(self) -> str:
        o = self.obs
        q = o.qemu
        lines = [
            f"mutant {o.mutant}: " + "; ".join(o.edits),
            f"  QEMU: {q.verdict}"
            + (f" ({q.reason})" if q.reason else "")
            + f"; qemu-img check exit {q.check_rc}; bitmaps {q.bitmaps}",
            f"  qbitmap check: {o.check.kind} exit {o.check.exit_code}"
            + (_findings_note(o.check) if o.check.kind == "ok" else f" {o.check.detail}"),
        ]
        for r in o.recover:
            lines.append(
                f"  recover --mode full{' --drop-broken' if r.drop_broken else ''} ({r.run.how}): "
                f"{_recover_note(r)}; changed {r.changed}"
                + (f"; then QEMU {r.after.verdict} {r.after.reason}" if r.after else "")
                + (f"; compare {r.compare_rc}" if r.compare_rc is not None else "")
            )
        for f in self.failures:
            lines.append(f"  FAIL {f.property}: {f.detail}")
        lines.append(f"  reproduce: {reproduce_command(o.mutant)}")
        return "\n".join(lines)


def _preload() -> None:
    """Import qbitmap's API once, so that each forked run does not import it again."""
    from qbitmap.check import check_path  # noqa: F401
    from qbitmap.recover import engine  # noqa: F401


def _work(args: tuple[mutants.MutantId, Path, int, Path | None]) -> Outcome:
    mid, workdir, cli_every, cache_dir = args
    _preload()
    try:
        obs = observe(mid, workdir, cli_every=cli_every, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - a harness failure is reported, never swallowed
        dummy = Observation(str(mid), [], [], QemuView("timeout", "harness"), Run("api", "ok"))
        dummy.harness_error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        return Outcome(dummy, [Failure("harness", dummy.harness_error, "harness error")])
    return Outcome(obs, evaluate(obs))


def run_many(
    ids: Sequence[mutants.MutantId],
    *,
    jobs: int = 2,
    workdir: Path,
    cli_every: int = CLI_EVERY,
    cache_dir: Path | None = None,
) -> Iterator[Outcome]:
    """Observe and judge every mutant, *jobs* at a time; yields outcomes in the order of *ids*."""
    for name in sorted({m.base for m in ids}):
        bases.build(name, cache_dir)  # once, before forking: the workers inherit the bytes
        mutants.base_layout(name, cache_dir)
    tasks = [(mid, workdir, cli_every, cache_dir) for mid in ids]
    if jobs <= 1:
        yield from map(_work, tasks)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_work, tasks, chunksize=1)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    count: int = 0
    seconds: float = 0.0
    checked: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    agreement: Counter = field(default_factory=Counter)  # (check row, qemu column)
    signatures: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    stricter: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failing_mutants: int = 0
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def add(self, out: Outcome) -> None:
        o = out.obs
        self.count += 1
        applicable = {"no-crash", "bounded", "refusal-changes-nothing"}
        if not o.qemu.needs_key:
            applicable |= {"rejected-exits-2", "usable-opens-rw"}
        if o.cli:
            applicable.add("cli-agrees")
        if o.qemu.accepted and o.qemu.in_use:
            applicable.add("in-use-not-ok")
        if o.qemu.check_rc == 3:
            applicable.add("leaks-not-ok")
        if o.check.kind in ("ok", "error") and o.check.exit_code == 0 and o.recover:
            applicable.add("ok-needs-no-repair")
        for r in o.recover:
            if r.changed and o.qemu.accepted:
                applicable |= {
                    "recovered-opens-rw",
                    "recovered-check-clean",
                    "recovered-same-data",
                    "recovered-keeps-bitmaps",
                }
            elif r.changed:
                applicable.add("never-worse")
        failed_props = {f.property for f in out.failures}
        for p in applicable | failed_props:
            self.checked[p] += 1
            if p in failed_props:
                self.failed[p] += 1
        row = str(o.check.exit_code) if o.check.kind in ("ok", "error") else o.check.kind
        if not o.harness_error:
            self.agreement[(row, o.qemu.verdict)] += 1
        for f in out.failures:
            self.signatures[(f.property, f.signature)].append(o.mutant)
        if out.failures:
            self.failing_mutants += 1
        if o.check.kind == "ok" and o.check.exit_code == 2 and o.qemu.accepted:
            key = ", ".join(o.check.result.get("corrupt_codes") or ["(no corrupt finding)"])
            self.stricter[key].append(o.mutant)
        runs = [o.check] + [r.run for r in o.recover if r.run.how == "api"]
        self.slowest.append((max(r.cpu for r in runs), o.mutant))
        self.slowest = sorted(self.slowest, reverse=True)[:5]

    def render(self) -> str:
        out = [
            (
                f"mutants run: {self.count} in {self.seconds:.1f} s; "
                f"{self.failing_mutants} with at least one failed property"
            ),
            "",
        ]
        out.append(f"{'property':<26} {'checked':>8} {'pass':>7} {'fail':>7}")
        for p in [*PROPERTIES, "harness"]:
            if self.checked[p] or p in PROPERTIES:
                c, f = self.checked[p], self.failed[p]
                out.append(f"{p:<26} {c:>8} {c - f:>7} {f:>7}")
        out.append("")
        cols = [*VERDICTS, "timeout"]
        rows = sorted({r for r, _c in self.agreement}, key=lambda r: (not r.isdigit(), r))
        out.append("verdict agreement: qbitmap check exit status (rows) x QEMU (columns)")
        out.append(f"{'':<12}" + "".join(f"{c:>9}" for c in cols) + f"{'total':>9}")
        for r in rows:
            cells = [self.agreement[(r, c)] for c in cols]
            label = f"exit {r}" if r.isdigit() else r
            out.append(f"{label:<12}" + "".join(f"{n:>9}" for n in cells) + f"{sum(cells):>9}")
        out.append("")
        if self.signatures:
            out.append("failures by property and signature (count, first mutants):")
            for (p, sig), mids in sorted(
                self.signatures.items(), key=lambda kv: (kv[0][0], -len(kv[1]))
            ):
                out.append(f"  {p}: {sig}: {len(mids)}  e.g. {', '.join(mids[:3])}")
            out.append("")
        if self.stricter:
            out.append(
                "stricter than QEMU (check exits 2, QEMU clean or leaks), by corrupt findings:"
            )
            for key, mids in sorted(self.stricter.items(), key=lambda kv: -len(kv[1])):
                out.append(f"  {key}: {len(mids)}  e.g. {', '.join(mids[:3])}")
            out.append("")
        out.append(
            "most CPU used by one in-process qbitmap run: "
            + ", ".join(f"{m} {s:.2f}s" for s, m in self.slowest)
        )
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line (scripts/fuzz)
# ---------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "qbitmap-fuzz"


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def _cleanup(workdir: Path | None) -> None:
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    """argparse with qbitmap's usage exit status (64, as for qbitmap itself) instead of 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="scripts/fuzz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Differential fuzzing of qbitmap against QEMU.\n\n"
            "Mutates qcow2 images made by QEMU's tools (seeded, reproducible; a mutant is\n"
            "named BASE:SEED), asks QEMU about each (qemu-img check, qemu-img info, a\n"
            "read-write open by qemu-io that loads and stores the bitmaps), runs qbitmap\n"
            "check and recover --mode full (with and without --drop-broken) on each, and\n"
            "checks the properties of issue 8. Prints, at the end: mutants run, passes and\n"
            "failures per property, the agreement of check's exit status with QEMU's\n"
            "verdict (clean / leaks / errors / refuses), failures grouped by signature,\n"
            "and where check is stricter than QEMU."
        ),
        epilog=(
            "properties:\n"
            + "\n".join(f"  {k}: {v}" for k, v in PROPERTIES.items())
            + "\n\nbases: "
            + ", ".join(bases.BASES)
            + "\noperators: "
            + ", ".join(mutants.OPERATOR_NAMES)
            + "\n\nexamples:\n"
            "  scripts/fuzz --count 5000 --seed 1 --jobs 2 --keep-failures /tmp/fails\n"
            "  scripts/fuzz --mutant crash64k:1234          # one mutant, in detail\n"
            "  scripts/fuzz --write-mutant crash64k:1234 m.qcow2 --write-mutant-base base.qcow2\n"
            "\nexit status: 0 every property held, 1 some failed, 64 usage error."
        ),
    )
    parser.add_argument("--count", type=int, default=500, help="mutants to run (default 500)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (default 0); mutants "
        "use seeds SEED..SEED+COUNT-1, and each seed picks its base",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="mutants in parallel (default: the number of CPUs)",
    )
    parser.add_argument(
        "--bases",
        default=",".join(bases.BASES),
        help="comma-separated base names to use (default: all)",
    )
    parser.add_argument(
        "--cli-every",
        type=int,
        default=CLI_EVERY,
        metavar="N",
        help=f"one mutant in N also goes through the command line (default {CLI_EVERY}; 0: never)",
    )
    parser.add_argument(
        "--keep-failures",
        type=Path,
        metavar="DIR",
        help="write every failing mutant as DIR/BASE-SEED.qcow2 with a .txt beside it",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="write every observation and failure as JSON lines to FILE",
    )
    parser.add_argument(
        "--mutant",
        metavar="BASE:SEED",
        action="append",
        help="run only this mutant and print everything about it (repeatable)",
    )
    parser.add_argument(
        "--write-mutant",
        nargs=2,
        metavar=("BASE:SEED", "FILE"),
        help="write the mutant's bytes to FILE, print its edits, and exit",
    )
    parser.add_argument(
        "--write-mutant-base",
        type=Path,
        metavar="FILE",
        help="with --write-mutant: also write its unmutated base image to FILE",
    )
    parser.add_argument(
        "--workdir", type=Path, help="scratch directory (default: a new temporary one)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=_cache_dir(),
        help="where built base images are kept (default: %(default)s)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="describe every failing mutant as it finishes"
    )
    args = parser.parse_args(argv)

    if args.write_mutant:
        try:
            mid = mutants.MutantId.parse(args.write_mutant[0])
        except ValueError as exc:
            parser.error(str(exc))
        m = mutants.write(mid, Path(args.write_mutant[1]), args.cache)
        if args.write_mutant_base:
            bases.write_base(mid.base, args.write_mutant_base, args.cache)
        print(f"{mid}: " + "\n  ".join(["", *m.edits]).lstrip("\n"))
        return 0
    names = tuple(n for n in args.bases.split(",") if n)
    unknown = [n for n in names if n not in bases.BASES]
    if unknown:
        parser.error(f"unknown base(s) {unknown}; known: {', '.join(bases.BASES)}")
    if args.mutant:
        try:
            ids = [mutants.MutantId.parse(t) for t in args.mutant]
        except ValueError as exc:
            parser.error(str(exc))
    else:
        ids = mutants.ids(args.count, args.seed, names)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qbitmap-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.keep_failures:
        args.keep_failures.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        jsonl = stack.enter_context(open(args.json, "w")) if args.json else None
        stack.callback(_cleanup, None if args.workdir else workdir)
        for i, out in enumerate(
            run_many(
                ids, jobs=args.jobs, workdir=workdir, cli_every=args.cli_every, cache_dir=args.cache
            ),
            1,
        ):
            summary.add(out)
            if args.mutant or (args.verbose and out.failures):
                print(out.describe(), flush=True)
            if jsonl:
                jsonl.write(
                    json.dumps(
                        {"observation": out.obs, "failures": out.failures}, default=_json_default
                    )
                    + "\n"
                )
            if out.failures and args.keep_failures:
                mid = mutants.MutantId.parse(out.obs.mutant)
                dest = args.keep_failures / f"{mid.base}-{mid.seed}.qcow2"
                mutants.write(mid, dest, args.cache)
                dest.with_suffix(".txt").write_text(out.describe() + "\n")
            if not args.mutant and i % 250 == 0:
                print(
                    f"... {i}/{len(ids)} mutants, {time.monotonic() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    summary.seconds = time.monotonic() - start
    print(summary.render())
    return 1 if summary.failing_mutants else 0


if __name__ == "__main__":
    sys.exit(main())
