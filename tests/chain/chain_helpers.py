"""Backing chains made by qemu-img, and QEMU's own account of them, for the chain tests.

A plain module: test modules import it by name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import qemu

MiB = 1 << 20
SIZE = 64 * MiB
BACKING_FORMAT_EXT = 0xE2792ACA


def make_chain(directory: Path, depth: int = 3, *, raw_bottom: bool = False) -> list[Path]:
    """``base <- mid <- ... <- top`` in *directory*, relative backing names; top first."""
    qemu.require_tools("qemu-img")
    paths: list[Path] = []
    if raw_bottom:
        base = directory / "base.raw"
        qemu.qemu_img("create", "-q", "-f", "raw", base, str(SIZE))
    else:
        base = qemu.create_image(directory / "base.qcow2", SIZE)
    paths.append(base)
    for i in range(1, depth):
        name = "top.qcow2" if i == depth - 1 else f"mid{i}.qcow2"
        below = paths[-1]
        fmt = "raw" if below.suffix == ".raw" else "qcow2"
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", below.name, "-F", fmt, directory / name)
        paths.append(directory / name)
    return paths[::-1]


def qemu_chain(path: Path) -> list[tuple[str, str]]:
    """``(filename, format)`` per layer as ``qemu-img info --backing-chain -U`` opens them."""
    proc = qemu.qemu_img("info", "-U", "--backing-chain", "--output=json", path)
    return [(layer["filename"], layer["format"]) for layer in json.loads(proc.stdout)]


def drop_backing_format_extension(path: Path) -> None:
    """Turn the backing format extension into the end of the extension list.

    QEMU then probes the backing file's format (the extension is the first
    one qemu-img writes, so nothing else is lost that a test needs).
    """
    exts = qemu.header_extensions(path)
    assert exts and exts[0][1] == BACKING_FORMAT_EXT, exts
    with open(path, "r+b") as f:
        f.seek(exts[0][0])
        f.write(struct.pack(">II", 0, 0))


def set_backing_name(path: Path, name: bytes) -> None:
    """Rewrite the backing file name in place (it stays where it was, in the first cluster)."""
    with open(path, "r+b") as f:
        head = f.read(104)
        offset = struct.unpack_from(">Q", head, 8)[0]
        assert offset, "image has no backing file"
        f.seek(offset)
        f.write(name)
        f.seek(16)
        f.write(struct.pack(">I", len(name)))


def relpath(path: Path | str, start: Path) -> str:
    return os.path.relpath(path, start)
