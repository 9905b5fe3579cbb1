#!/usr/bin/env bash
# Rebuild examples/sample.qcow2 with QEMU's own tools (qemu-img, qemu-io).
#
# The same recipe as tests/fixtures/golden/generate.sh "sample.qcow2", with
# the writes done as write-zeroes requests: the bitmaps record them exactly
# as they would record data, but no data clusters are stored, so the image
# stays small enough to keep in the repository uncompressed.
#
#   1 GiB virtual, 64 KiB clusters
#   weekly  1 MiB granularity, recorded three writes, then disabled
#   daily   64 KiB granularity, enabled, recorded four writes
set -euo pipefail
out=${1:-$(cd "$(dirname "$0")" && pwd)/sample.qcow2}
io() { local img=$1; shift; printf '%s\n' "$@" | qemu-io -f qcow2 "$img" >/dev/null; }

rm -f "$out"
qemu-img create -q -f qcow2 -o cluster_size=65536 "$out" 1G
io "$out" "write -z 0 1M" "write -z 512M 64k"            # before any bitmap: recorded nowhere
qemu-img bitmap --add -g 1M "$out" weekly
io "$out" "write -z 4M 4k" "write -z 100M 2M" "write -z 1023M 512"
qemu-img bitmap --disable "$out" weekly
qemu-img bitmap --add -g 64K "$out" daily
io "$out" "write -z 64k 64k" "write -z 300M 130k" "write -z 1000M 1" \
    "write -z $((1024 * 1024 * 1024 - 4096)) 4k"
