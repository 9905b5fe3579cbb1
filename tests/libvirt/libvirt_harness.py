"""A real libvirtd for the tests: started, used through virsh, and stopped again.

:class:`LibvirtDaemons` prepares what Debian's libvirt 9.0 needs to run QEMU
domains here as root (docs/libvirt-facts.md, "Running libvirtd in the
tests"): the ``libvirt-qemu`` user and group, a minimal
``/etc/libvirt/qemu.conf`` (``user``/``group`` root, ``security_driver =
"none"``; an existing file is kept aside and put back), ``/var/log/libvirt``,
then ``virtlogd -d`` and ``libvirtd -d``.  :meth:`LibvirtDaemons.stop` kills
every domain the tests defined, undefines it, stops the two daemons it
started (by their pid files, after checking the process names) and restores
``qemu.conf``; it runs even when a test failed.  A daemon that was already
running is used and left running.  Runs of the suite are serialised by a
lock file, since there is one system libvirtd.

:class:`TestDomain` is a ``type='qemu'`` domain (TCG: no ``/dev/kvm``
needed) with qcow2 disks and no operating system; it starts in about half
a second.  Guest writes go through QEMU's own device backend
(``qemu-io -d /machine/peripheral/virtio-diskN/virtio-backend`` over the
HMP monitor), so they mark the dirty bitmaps as a guest's writes would.

A plain module: test modules import it by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import grp
import json
import os
import pwd
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import qemu

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
QEMU_CONF_TEXT = 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
LOG_DIR = Path("/var/log/libvirt")
LOCK_FILE = Path("/run/lock/qbitmap-libvirt-tests.lock")
#: What a session changed, written before each change: a run that was killed
#: leaves it behind, and the next run adopts its daemons and restores qemu.conf.
STATE_FILE = Path("/run/lock/qbitmap-libvirt-tests.json")
SAVED_CONF = Path("/run/lock/qbitmap-libvirt-tests.qemu.conf")
PID_FILES = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
QEMU_PID_DIR = Path("/run/libvirt/qemu")
#: Every domain the tests define has this prefix; stop() removes all of them.
PREFIX = "qbmtest-"
TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "nbdinfo")

#: libvirt's error for a checkpoint whose bitmap it refuses.
INCONSISTENT = "checkpoint inconsistent: missing or broken bitmap '{name}' for disk '{disk}'"


class LibvirtError(RuntimeError):
    """virsh failed, or libvirt did not reach the expected state in time."""


def require_root() -> None:
    """Root is needed for the system libvirtd; fail in CI, skip elsewhere."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise RuntimeError("the libvirt tests need root (CI is set: they may not skip)")
    import pytest

    pytest.skip("the libvirt tests need root")


def virsh(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120):
    """``virsh -c qemu:///system ARGS``; raises LibvirtError on failure when *check*."""
    argv = ["virsh", "-c", URI, *map(os.fspath, args)]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LibvirtError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LibvirtError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _pid_of(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int, name: str | None = None) -> bool:
    """Whether *pid* is a live (not zombie) process, called *name* if given."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    state = stat[stat.rindex(")") + 2]
    if state in "ZX":
        return False
    return name is None or comm == name[:15]


def _stop_pid(pid: int, name: str, timeout: float = 20) -> None:
    if not _alive(pid, name):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid, name) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid, name):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid, name) and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LibvirtError(f"{what}: not reached after {timeout}s")
        time.sleep(0.05)


class OrphanReaper:
    """Reaps the daemons and QEMU processes libvirt daemonizes, as soon as they exit.

    libvirt waits for a stopped QEMU's pid to vanish before it calls the
    domain shut off (it polls the pid, 200 ms at a time); a daemonized QEMU
    is an orphan, and on a machine whose init reaps orphans slowly that wait
    took 1.4-2 s per stop here.  This process becomes a child subreaper
    (prctl PR_SET_CHILD_SUBREAPER) before it starts the daemons, so their
    orphans become its children, and a thread reaps the ones named in
    :data:`NAMES` once they are zombies.  Only those: the children
    ``subprocess`` starts are left to ``subprocess``.
    """

    NAMES = frozenset({"libvirtd", "virtlogd", "qemu-system-x86"})
    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return  # not Linux, or refused: the tests are only slower
        self._thread = threading.Thread(target=self._run, name="orphan-reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.reap()

    def reap(self) -> None:
        me = os.getpid()
        for children in Path(f"/proc/{me}/task").glob("*/children"):
            try:
                pids = children.read_text().split()
            except OSError:
                continue
            for pid in map(int, pids):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                if comm in self.NAMES and stat[stat.rindex(")") + 2] == "Z":
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            self.reap()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class LibvirtDaemons:
    """virtlogd and libvirtd for one test session (see the module docstring)."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}  # daemon name -> pid, for the ones started here
        self._conf_backup: bytes | None = None
        self._conf_written = False
        self._lock_fd: int | None = None
        self._reaper = OrphanReaper()

    def start(self) -> LibvirtDaemons:
        require_root()
        qemu.require_tools(*TOOLS)
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._ensure_user()
        self._adopt_killed_run()
        if self._daemon_answers():
            self.remove_test_domains()  # left by a run that was killed
            if self.started or self._conf_written:
                self._reaper.start()
            return  # ours from a killed run (stopped at the end), or not ours (left running)
        if not self._conf_written:
            if QEMU_CONF.exists():
                self._conf_backup = QEMU_CONF.read_bytes()
                SAVED_CONF.write_bytes(self._conf_backup)
            self._conf_written = True
            self._save_state()
            QEMU_CONF.write_text(QEMU_CONF_TEXT)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._reaper.start()
        for name in ("virtlogd", "libvirtd"):
            pid = _pid_of(PID_FILES[name])
            if pid is not None and _alive(pid, name):
                continue
            subprocess.run([name, "-d"], check=True, timeout=60, stdin=subprocess.DEVNULL)
            _wait(
                lambda name=name: (p := _pid_of(PID_FILES[name])) is not None and _alive(p, name),
                f"{name} started",
            )
            self.started[name] = _pid_of(PID_FILES[name])  # type: ignore[assignment]
            self._save_state()
        _wait(self._daemon_answers, "libvirtd answers on qemu:///system", timeout=60)

    def _save_state(self) -> None:
        STATE_FILE.write_text(
            json.dumps({"started": self.started, "conf_saved": self._conf_backup is not None})
        )

    def _adopt_killed_run(self) -> None:
        """Take over what a run killed before its clean-up left: daemons, qemu.conf."""
        try:
            state = json.loads(STATE_FILE.read_text())
        except (OSError, ValueError):
            return
        self.started = {
            name: pid for name, pid in state.get("started", {}).items() if _alive(pid, name)
        }
        self._conf_written = True
        self._conf_backup = SAVED_CONF.read_bytes() if state.get("conf_saved") else None

    @staticmethod
    def _ensure_user() -> None:
        # libvirt's QEMU driver looks the user up at start-up even when qemu.conf says root.
        try:
            grp.getgrnam("libvirt-qemu")
        except KeyError:
            subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True, timeout=60)
        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--gid",
                    "libvirt-qemu",
                    "--no-create-home",
                    "--home-dir",
                    "/var/lib/libvirt",
                    "--shell",
                    "/usr/sbin/nologin",
                    "libvirt-qemu",
                ],
                check=True,
                timeout=60,
            )

    @staticmethod
    def _daemon_answers() -> bool:
        try:
            return virsh("uri", check=False, timeout=10).returncode == 0
        except LibvirtError:
            return False

    def remove_test_domains(self) -> None:
        """Kill and undefine every domain the tests defined (by name prefix)."""
        if not self._daemon_answers():
            return
        listed = virsh("list", "--all", "--name", check=False)
        for name in listed.stdout.split():
            if name.startswith(PREFIX):
                TestDomain.remove(name)

    def stop(self) -> None:
        """Undo start(): domains, daemons started here, qemu.conf, the lock.  Never raises."""
        with contextlib.suppress(Exception):
            self.remove_test_domains()
        for pid_file in QEMU_PID_DIR.glob(f"{PREFIX}*.pid"):
            # A QEMU whose libvirtd is gone would otherwise keep running.
            pid = _pid_of(pid_file)
            if pid is not None:
                with contextlib.suppress(Exception):
                    _stop_pid(pid, "qemu-system-x86_64")
        for name in ("libvirtd", "virtlogd"):
            pid = self.started.pop(name, None)
            if pid is not None:
                with contextlib.suppress(Exception):
                    _stop_pid(pid, name)
        self._reaper.stop()
        if self._conf_written:
            with contextlib.suppress(Exception):
                if self._conf_backup is None:
                    QEMU_CONF.unlink(missing_ok=True)
                else:
                    QEMU_CONF.write_bytes(self._conf_backup)
            self._conf_written = False
        if not self.started:
            with contextlib.suppress(Exception):
                STATE_FILE.unlink(missing_ok=True)
                SAVED_CONF.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _domain_xml(name: str, disks: list[tuple[str, Path]]) -> str:
    disk_xml = "".join(
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
"""
        for target, path in disks
    )
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disk_xml}    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class TestDomain:
    """A test domain: qcow2 disks in *workdir*, no OS (see the module docstring)."""

    __test__ = False  # not a pytest class

    def __init__(self, workdir: Path, *, disks: tuple[str, ...] = ("vda",), size: str = "256M"):
        self.name = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.disks: dict[str, Path] = {}
        for target in disks:
            path = workdir / f"{self.name}-{target}.qcow2"
            qemu.qemu_img("create", "-q", "-f", "qcow2", path, size)
            self.disks[target] = path
        self._backups = 0

    # -- life cycle --------------------------------------------------------------------------

    def define(self) -> TestDomain:
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(_domain_xml(self.name, list(self.disks.items())))
        virsh("define", xml)
        return self

    def start(self) -> None:
        virsh("start", self.name)

    def state(self) -> str:
        return virsh("domstate", self.name).stdout.strip()

    def stop_cleanly(self) -> None:
        """``virsh destroy``: SIGTERM, so QEMU closes the images and stores its bitmaps."""
        virsh("destroy", self.name)
        _wait(lambda: self.state() == "shut off", f"{self.name} shut off")

    def kill(self) -> None:
        """SIGKILL the domain's QEMU (a crash) and wait until libvirt has noticed."""
        pid = _pid_of(QEMU_PID_DIR / f"{self.name}.pid")
        if pid is None or not _alive(pid):
            raise LibvirtError(f"{self.name}: no QEMU process to kill")
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: self.state() == "shut off", f"{self.name} shut off after SIGKILL")

    @staticmethod
    def remove(name: str) -> None:
        virsh("destroy", name, check=False)
        virsh("undefine", name, "--checkpoints-metadata", "--snapshots-metadata", check=False)

    # -- inside the running domain ---------------------------------------------------------------

    def write(self, offset: str, length: str, *, pattern: int = 7, disk: int = 0) -> None:
        """A guest write through the device backend of virtio-disk*disk*."""
        command = (
            f"qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend "
            f'"write -P {pattern} {offset} {length}"'
        )
        out = virsh("qemu-monitor-command", self.name, "--hmp", command).stdout
        if "error" in out.lower() or "failed" in out.lower():
            raise LibvirtError(f"guest write failed: {out.strip()}")

    def flush(self, *, disk: int = 0) -> None:
        """Flush virtio-disk*disk*'s backend: guest data and qcow2 metadata reach the file.

        A write followed by a SIGKILL without it may not survive the kill
        (docs/libvirt-facts.md); tests that compare data after a crash flush.
        """
        command = f'qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend "flush"'
        out = virsh("qemu-monitor-command", self.name, "--hmp", command).stdout
        if "error" in out.lower() or "failed" in out.lower():
            raise LibvirtError(f"flush failed: {out.strip()}")

    def checkpoint(self, name: str) -> None:
        virsh("checkpoint-create-as", self.name, name)

    def checkpoint_names(self) -> list[str]:
        return virsh("checkpoint-list", self.name, "--name").stdout.split()

    def snapshot_disk_only(self, name: str, overlays: dict[str, Path]) -> None:
        specs = []
        for target, path in overlays.items():
            specs += ["--diskspec", f"{target},file={path}"]
        virsh("snapshot-create-as", self.name, name, "--disk-only", "--no-metadata", *specs)
        self.disks.update(overlays)

    def node_bitmaps(self) -> dict[str, list[tuple[str, bool, bool]]]:
        """QEMU's own view: per node file name, ``(name, recording, inconsistent)``."""
        out = virsh(
            "qemu-monitor-command",
            self.name,
            json.dumps({"execute": "query-named-block-nodes", "arguments": {"flat": True}}),
        ).stdout
        nodes = json.loads(out)["return"]
        return {
            n["file"]: [
                (b["name"], b.get("recording", False), b.get("inconsistent", False))
                for b in n.get("dirty-bitmaps", [])
            ]
            for n in nodes
            if n["drv"] == "qcow2"
        }

    # -- libvirt's verdict ---------------------------------------------------------------------

    def backup_begin(self, checkpoint: str) -> subprocess.CompletedProcess:
        """``virsh backup-begin`` in pull mode from *checkpoint* (vda only); not aborted."""
        self._backups += 1
        # /tmp: a UNIX socket path must stay under 108 bytes.
        sock = Path(tempfile.mkdtemp(prefix="qbm-bk-", dir="/tmp")) / "bk.sock"
        scratch = self.workdir / f"{self.name}-scratch{self._backups}.qcow2"
        xml = self.workdir / f"{self.name}-backup{self._backups}.xml"
        xml.write_text(
            f"<domainbackup mode='pull'><incremental>{checkpoint}</incremental>"
            f"<server transport='unix' socket='{sock}'/><disks>"
            f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
            f"</disks></domainbackup>"
        )
        proc = virsh("backup-begin", self.name, xml, check=False)
        proc.socket = sock  # type: ignore[attr-defined]
        proc.scratch = scratch  # type: ignore[attr-defined]
        return proc

    def abort_backup(self) -> None:
        virsh("domjobabort", self.name)
        _wait(
            lambda: "None" in virsh("domjobinfo", self.name).stdout.splitlines()[0],
            f"{self.name}: backup job ended",
        )

    def libvirt_accepts(self, checkpoint: str) -> tuple[bool, str]:
        """Whether libvirt starts an incremental backup from *checkpoint*, and its error.

        A started backup is aborted at once.  The answer is also checked
        against ``checkpoint-create --redefine --redefine-validate``, which
        must agree.
        """
        proc = self.backup_begin(checkpoint)
        started = proc.returncode == 0
        if started:
            self.abort_backup()
        error = proc.stderr.strip().removeprefix("error: ")
        redefine = self.redefine_validate(checkpoint)
        if (redefine.returncode == 0) != started:
            raise LibvirtError(
                f"backup-begin and --redefine-validate disagree on {checkpoint}: "
                f"{error!r} / {redefine.stderr.strip()!r}"
            )
        return started, error

    def redefine_validate(self, checkpoint: str) -> subprocess.CompletedProcess:
        xml = self.workdir / f"{self.name}-{checkpoint}-redefine.xml"
        xml.write_text(virsh("checkpoint-dumpxml", self.name, checkpoint).stdout)
        return virsh(
            "checkpoint-create", self.name, xml, "--redefine", "--redefine-validate", check=False
        )

    def dirty_map(self, socket: Path, disk: str = "vda") -> list[dict]:
        """``nbdinfo --map=qemu:dirty-bitmap:backup-DISK`` on a pull backup's socket."""
        proc = subprocess.run(
            [
                "nbdinfo",
                "--json",
                f"--map=qemu:dirty-bitmap:backup-{disk}",
                f"nbd+unix:///{disk}?socket={socket}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(proc.stdout)


def qbitmap_checkpoints(domain: TestDomain) -> tuple[int, dict]:
    """``qbitmap checkpoints --json DOMAIN`` in-process: (exit status, report)."""
    from click.testing import CliRunner

    from qbitmap.cli import cli

    result = CliRunner().invoke(cli, ["checkpoints", "--json", domain.name], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def qbitmap_repair(domain: TestDomain, *args: str) -> tuple[int, dict]:
    """``qbitmap checkpoints --json --repair DOMAIN ARGS`` in-process: (exit status, report)."""
    from click.testing import CliRunner

    from qbitmap.cli import cli

    assert domain.state() == "shut off"
    result = CliRunner().invoke(
        cli, ["checkpoints", "--json", "--repair", domain.name, *args], catch_exceptions=False
    )
    return result.exit_code, json.loads(result.stdout)


def qbitmap_verdicts(domain: TestDomain, disk: str = "vda") -> dict[str, str]:
    """qbitmap's verdict per checkpoint for *disk*, on the shut-off domain."""
    assert domain.state() == "shut off"
    _code, report = qbitmap_checkpoints(domain)
    return {
        c["name"]: d["verdict"]
        for c in report["checkpoints"]
        for d in c["disks"]
        if d["disk"] == disk
    }


def _writers_of(directory: Path) -> list[int]:
    """Live qemu-nbd processes whose command line names a file in *directory*."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"qemu-nbd")
            and any(a.startswith(os.fsencode(directory)) for a in argv)
        ):
            pid = int(cmdline.parent.name)
            if _alive(pid):
                out.append(pid)
    return out


def virtnbdbackup(domain: TestDomain, level: str, output: Path) -> subprocess.CompletedProcess:
    """``virtnbdbackup -d DOMAIN -l LEVEL -o OUTPUT`` (full or inc) on the running domain."""
    return subprocess.run(
        ["virtnbdbackup", "-U", URI, "-d", domain.name, "-l", level, "-o", str(output), "-n"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def virtnbdrestore(backup: Path, output: Path) -> Path:
    """Restore the whole chain in *backup* into *output*; returns the restored vda image."""
    proc = subprocess.run(
        ["virtnbdrestore", "-U", URI, "-i", str(backup), "-o", str(output), "-n"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise LibvirtError(f"virtnbdrestore failed: {proc.stderr.strip()[-2000:]}")
    # virtnbdrestore returns while the 'qemu-nbd --fork' it wrote through is still closing
    # the image; until that process is gone the image lacks its last metadata updates.
    _wait(lambda: not _writers_of(output), f"qemu-nbd of {output} gone", timeout=60)
    images = sorted(p for p in output.iterdir() if p.suffix == ".qcow2")
    if len(images) != 1:
        raise LibvirtError(f"virtnbdrestore left {images} in {output}")
    return images[0]
