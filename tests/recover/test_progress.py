"""The comparison shows a rich progress bar on a terminal, and nothing on a pipe."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys


def _run(argv, *, tty: bool) -> tuple[int, bytes]:
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    if not tty:
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=120, check=False)
        return proc.returncode, proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk and proc.poll() is not None:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(), out


def test_progress_on_a_terminal_only(crashed):
    image2 = crashed.tmp / "second.qcow2"
    shutil.copyfile(crashed.image, image2)
    argv = [sys.executable, "-m", "qbitmap", "recover", "--reference", str(crashed.backup)]
    rc, err = _run([*argv, str(crashed.image)], tty=False)
    assert rc == 0 and err == b"", err
    rc, err = _run([*argv, str(image2)], tty=True)
    assert rc == 0
    assert b"comparing with the reference" in err, err[-500:]
