#!/usr/bin/env bash
# Install everything the test suite needs, idempotently (re-runs are fast):
#   1. Debian packages with the QEMU tools the tests drive for real (and strace,
#      which kills recover at chosen syscalls in tests/recover):
#      qemu-utils (qemu-img, qemu-io, qemu-nbd), qemu-system-common
#      (qemu-storage-daemon), libnbd-bin (nbdinfo), man-db and groff-base (man
#      pages render), mandoc (man pages lint clean);
#      for tests/libvirt, a real libvirtd running QEMU domains: libvirt-daemon,
#      libvirt-daemon-driver-qemu, libvirt-clients (virsh), qemu-system-x86,
#      and the backup client virtnbdbackup (with virtnbdrestore);
#   2. a virtualenv .venv in the repository;
#   3. qbitmap itself, editable, with its "test" extra (pytest, hypothesis).
# Run from anywhere; needs root (or sudo) only if a Debian package is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

debs=(qemu-utils qemu-system-common libnbd-bin man-db groff-base mandoc strace
      libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 virtnbdbackup)
missing=()
for p in "${debs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    echo "install-test-deps: installing Debian packages: ${missing[*]}" >&2
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "install-test-deps: need root or sudo for apt-get" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q </dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${missing[@]}" </dev/null
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "install-test-deps: creating .venv with $python" >&2
    "$python" -m venv .venv
fi

# Reinstall only when the project metadata changed since the last install.
stamp=.venv/.qbitmap-test-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' </dev/null
    echo "$want" >"$stamp"
fi
