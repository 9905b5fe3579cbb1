#!/usr/bin/env bash
# Rebuild the sample images in examples/ with QEMU's own tools (qemu-img, qemu-io).
#
#   examples/make-sample.sh [DIR]      (DIR defaults to examples/)
#
# sample.qcow2: the same recipe as tests/fixtures/golden/generate.sh
# "sample.qcow2", with the writes done as write-zeroes requests: the bitmaps
# record them exactly as they would record data, but no data clusters are
# stored, so the image stays small enough to keep in the repository
# uncompressed.
#
#   1 GiB virtual, 64 KiB clusters
#   weekly  1 MiB granularity, recorded three writes, then disabled
#   daily   64 KiB granularity, enabled, recorded four writes
#
# crashed.qcow2: sample.qcow2 after a QEMU process crashed while it had the
# image open read-write.  qemu-io opens it (QEMU marks both bitmaps in-use on
# disk as it opens them), writes three ranges of data (two compressed
# clusters and one 4 KiB write, so the file stays small), flushes them to the
# file, then raises SIGKILL in its own process: QEMU never stores the
# bitmaps, so they stay in-use with their contents as of sample.qcow2, and
# the three writes are missing from them.  qemu-img check finds no error;
# qbitmap check exits 4.  sample.qcow2 holds the guest data as of before the
# crash: the reference for 'qbitmap recover --reference'.
#
#   crash writes  0x51 at 16 MiB (64 KiB, compressed),
#                 0x52 at 500 MiB (64 KiB, compressed),
#                 0x53 at 1000 MiB + 64 KiB (4 KiB)
set -euo pipefail
dir=${1:-$(cd "$(dirname "$0")" && pwd)}
out=$dir/sample.qcow2
crashed=$dir/crashed.qcow2
io() { local img=$1; shift; printf '%s\n' "$@" | qemu-io -f qcow2 "$img" >/dev/null; }

rm -f "$out" "$crashed"
qemu-img create -q -f qcow2 -o cluster_size=65536 "$out" 1G
io "$out" "write -z 0 1M" "write -z 512M 64k"            # before any bitmap: recorded nowhere
qemu-img bitmap --add -g 1M "$out" weekly
io "$out" "write -z 4M 4k" "write -z 100M 2M" "write -z 1023M 512"
qemu-img bitmap --disable "$out" weekly
qemu-img bitmap --add -g 64K "$out" daily
io "$out" "write -z 64k 64k" "write -z 300M 130k" "write -z 1000M 1" \
    "write -z $((1024 * 1024 * 1024 - 4096)) 4k"

cp "$out" "$crashed"
# qemu-io's own "sigraise 9" is the crash: the process dies of SIGKILL (status 137).
# (A subshell, so that the shell's "Killed" notice goes nowhere.)
status=0
(
    printf '%s\n' "write -c -P 0x51 16M 64k" "write -c -P 0x52 500M 64k" \
        "write -P 0x53 $((1000 * 1024 * 1024 + 65536)) 4k" flush "sigraise 9" |
        qemu-io -f qcow2 "$crashed" >/dev/null
) 2>/dev/null || status=$?
if [[ $status -ne 137 ]]; then
    echo "make-sample.sh: qemu-io was to die of SIGKILL (137), it exited $status" >&2
    exit 1
fi
flags=$(qemu-img info -U --output=json "$crashed")
if [[ $(grep -c '"in-use"' <<<"$flags") -ne 2 ]]; then
    echo "make-sample.sh: crashed.qcow2 does not have both bitmaps in use" >&2
    exit 1
fi
