"""Real images for the format-layer tests, made by qemu-img / qemu-io (session scoped).

Every image here is produced by QEMU's own tools; a few are then edited by
hand (an unknown header extension, a 104-byte or 120-byte v3 header) in ways
QEMU itself accepts, which the tests check with ``qemu-img info``.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import qemu

UNKNOWN_MAGIC = 0x5142_7E57  # not a type QEMU knows


def _with_bitmaps(path: Path, *names: str, granularity: int | None = None) -> Path:
    for name in names:
        qemu.add_bitmap(path, name, granularity=granularity)
    return path


def _write_some(path: Path, size: int) -> None:
    step = max(size // 7, 1 << 16)
    qemu.qemu_io_write(path, [(min(i * step, size - 65536), 65536) for i in range(7)], unsafe=True)


def _resize_header(src: Path, dest: Path, header_length: int, unknown: bytes = b"") -> Path:
    """Copy *src* (a QEMU v3 image with a 112-byte header, no backing file) with
    a header of *header_length* bytes: 104 drops compression_type and its
    padding, more than 112 appends *unknown* additional header bytes.  The
    extensions move with the header end; the rest of cluster 0 stays zero.
    """
    raw = bytearray(src.read_bytes())
    cluster_size = 1 << struct.unpack_from(">I", raw, 20)[0]
    assert struct.unpack_from(">I", raw, 100)[0] == 112
    exts = bytes(raw[112:cluster_size])
    if header_length == 104:
        assert raw[104] == 0, "compression type must be zlib to drop the field"
        head = bytes(raw[:104])
    else:
        assert len(unknown) == header_length - 112
        head = bytes(raw[:112]) + unknown
    head = head[:100] + struct.pack(">I", header_length) + head[104:]
    area = (head + exts)[:cluster_size]
    raw[:cluster_size] = area + bytes(cluster_size - len(area))
    dest.write_bytes(bytes(raw))
    return dest


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name -> image path, each made by QEMU (read-only: copy before editing)."""
    qemu.require_tools("qemu-img", "qemu-io")
    d = tmp_path_factory.mktemp("format-images")
    out: dict[str, Path] = {}
    mib = 1 << 20

    base = qemu.create_image(d / "base.qcow2", 64 * mib)
    _write_some(base, 64 * mib)

    out["v2"] = qemu.create_image(d / "v2.qcow2", 64 * mib, compat="0.10")
    _write_some(out["v2"], 64 * mib)
    out["v2-backing"] = qemu.create_image(
        d / "v2-backing.qcow2", None, compat="0.10", backing=base, backing_fmt="qcow2"
    )
    out["v3-backing"] = _with_bitmaps(
        qemu.create_image(d / "v3-backing.qcow2", None, backing=base, backing_fmt="qcow2"), "b0"
    )
    _write_some(out["v3-backing"], 64 * mib)

    luks = d / "luks.qcow2"
    attempts = 8
    for attempt in range(attempts):
        # QEMU times a first PBKDF2 round to pick the iteration count and fails
        # ("Unable to get accurate CPU usage") when the thread CPU clock did
        # not tick during it; sha512 makes that round slower, retries do the rest.
        proc = qemu.qemu_img(
            "create", "-q", "--object", "secret,id=s0,data=x", "-f", "qcow2",
            "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.hash-alg=sha512,"
            "encrypt.iter-time=100",
            luks, str(64 * mib), check=attempt == attempts - 1,
        )  # fmt: skip
        if proc.returncode == 0:
            break
    out["luks"] = luks

    out["data-file"] = qemu.create_image(
        d / "data-file.qcow2",
        64 * mib,
        extra_opts=[f"data_file={d / 'data-file.raw'}", "data_file_raw=on"],
    )
    out["zstd"] = _with_bitmaps(
        qemu.create_image(d / "zstd.qcow2", 64 * mib, compression_type="zstd"), "b0"
    )
    out["extended-l2"] = _with_bitmaps(
        qemu.create_image(d / "extended-l2.qcow2", 64 * mib, extended_l2=True), "b0", "b1"
    )
    _write_some(out["extended-l2"], 64 * mib)

    bitmaps = qemu.create_image(d / "bitmaps.qcow2", 256 * mib)
    qemu.add_bitmap(bitmaps, "g512", granularity=512)
    qemu.add_bitmap(bitmaps, "g64k")
    qemu.add_bitmap(bitmaps, "g4m", granularity=4 * mib)
    qemu.add_bitmap(bitmaps, "off", disabled=True)
    _write_some(bitmaps, 256 * mib)
    out["bitmaps"] = bitmaps

    out["cluster512"] = _with_bitmaps(
        qemu.create_image(d / "cluster512.qcow2", 16 * mib, cluster_size=512), "b0", "b1"
    )
    _write_some(out["cluster512"], 16 * mib)
    out["cluster2m"] = _with_bitmaps(
        qemu.create_image(d / "cluster2m.qcow2", 64 * mib, cluster_size=2 * mib), "b0"
    )
    _write_some(out["cluster2m"], 64 * mib)

    unknown = d / "unknown-ext.qcow2"
    shutil.copyfile(bitmaps, unknown)
    qemu.append_header_extension(unknown, UNKNOWN_MAGIC, b"kept as raw bytes")
    out["unknown-ext"] = unknown

    out["header104"] = _resize_header(base, d / "h104.qcow2", 104)
    out["header120"] = _resize_header(
        base, d / "h120.qcow2", 120, b"\x01\x02\x03\x04\x05\x06\x07\x08"
    )

    for path in out.values():
        path.chmod(0o444)
        qemu.img_info(path)  # QEMU opens every one of them
    return out
