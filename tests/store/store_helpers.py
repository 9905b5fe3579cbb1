from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import qemu

from qbitmap.format import BitmapEntry, BitmapFlag, Geometry, layout
from qbitmap.store import WriteSession
from qbitmap.store.session import bitmaps_extension_bytes


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_counts(path: Path) -> tuple[int, int, int]:
    """(exit code, corruptions, leaks) of qemu-img check."""
    rc, report = qemu.img_check(path)
    assert "error" not in report, report
    return rc, report.get("corruptions", 0), report.get("leaks", 0)


def add_bitmap_with_store(
    path: Path,
    name: str,
    bits: np.ndarray,
    *,
    granularity_bits: int = 16,
    in_use: bool = False,
    **open_kw,
) -> WriteSession:
    """Append a bitmap holding *bits* through the store (what recover does for each bitmap)."""
    with WriteSession.open(path, **open_kw) as s:
        geo = Geometry(s.image.virtual_size, 1 << granularity_bits, s.cluster_size)
        old = list(s.image.read_directory().entries)
        new = s.write_bitmap(geo, bits, name=name)
        flags = BitmapFlag.AUTO | (BitmapFlag.IN_USE if in_use else 0)
        entry = BitmapEntry(
            offset=0,
            index=len(old),
            bitmap_table_offset=new.table_offset,
            bitmap_table_size=new.table_size,
            flags=flags,
            type=1,
            granularity_bits=granularity_bits,
            extra_data=b"",
            name=name.encode(),
            padding=bytes(-(24 + len(name)) % 8),
        )
        entries = [*old, entry]
        ext, size = s.write_directory(entries)
        s.commit_header(
            extensions={
                layout.EXT_BITMAPS: bitmaps_extension_bytes(len(entries), ext.offset, size)
            },
            autoclear_set=1,
        )
        bext = s.image.bitmaps_extension
        if bext is not None:
            from qbitmap.store.session import directory_extent

            s.free(
                [
                    directory_extent(
                        bext.bitmap_directory_offset, bext.bitmap_directory_size, s.cluster_size
                    )
                ],
                what="old directory",
            )
            s.flush()
        return s


def bits_to_extents(bits: np.ndarray, granularity: int, virtual_size: int) -> list[tuple[int, int]]:
    unpacked = np.unpackbits(bits, bitorder="little")
    out = []
    idx = np.flatnonzero(unpacked)
    for i in idx.tolist():
        start = i * granularity
        if start >= virtual_size:
            break
        out.append((start, min(granularity, virtual_size - start)))
    return qemu.merge_extents(out)


@pytest.fixture
def img(tmp_path: Path):
    def make(size="64M", *, cluster_size=65536, refcount_bits=16, name="a.qcow2", **kw) -> Path:
        return qemu.create_image(
            tmp_path / name,
            size,
            cluster_size=cluster_size,
            extra_opts=[f"refcount_bits={refcount_bits}"],
            **kw,
        )

    return make
