"""``build(parse(b)) == b`` for every structure of real images, and what they decode to.

Images come from ``conftest.images`` (qemu-img/qemu-io, a few hand edits QEMU
accepts).  Each structure is checked at two levels: the schema in
``layout`` on the raw bytes, and the typed model built from the parse.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import qemu

from qbitmap.format import (
    BitmapEntry,
    Extension,
    Header,
    Image,
    IncompatibleFeature,
    layout,
)

ALL = [
    "v2",
    "v2-backing",
    "v3-backing",
    "luks",
    "data-file",
    "zstd",
    "extended-l2",
    "bitmaps",
    "cluster512",
    "cluster2m",
    "unknown-ext",
    "header104",
    "header120",
]
UNKNOWN_MAGIC = 0x5142_7E57  # the extension conftest.images adds to "unknown-ext"
WITH_BITMAPS = [
    "v3-backing",
    "zstd",
    "extended-l2",
    "bitmaps",
    "cluster512",
    "cluster2m",
    "unknown-ext",
]


def cluster0(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[: 1 << struct.unpack_from(">I", raw, 20)[0]]


@pytest.mark.parametrize("name", ALL)
def test_header_roundtrip(images: dict[str, Path], name: str) -> None:
    raw = cluster0(images[name])
    with Image.open(images[name]) as img:
        length = img.header.effective_header_length
        parsed = layout.Header.parse(raw)
        assert layout.Header.build(parsed) == raw[:length]
        model = Header.from_container(parsed)
        assert model == img.header
        assert model.build() == raw[:length]


@pytest.mark.parametrize("name", ALL)
def test_extensions_roundtrip(images: dict[str, Path], name: str) -> None:
    raw = cluster0(images[name])
    with Image.open(images[name]) as img:
        assert img.extension_error is None
        # Same list as an independent walk of the area (tests/qemu.py).
        assert [(e.offset, e.magic, e.data) for e in img.extensions] == qemu.header_extensions(
            images[name]
        )
        for ext in img.extensions:
            blob = raw[ext.offset : ext.offset + ext.total_size]
            parsed = layout.HeaderExtension.parse(blob)
            assert layout.HeaderExtension.build(parsed) == blob
            assert ext.build() == blob
            assert Extension(ext.offset, parsed.magic, parsed.data, parsed.padding) == ext
        assert img.end_marker_offset is not None
        assert raw[img.end_marker_offset : img.end_marker_offset + 8] == bytes(8)


@pytest.mark.parametrize("name", ALL)
def test_cluster0_rebuilt_from_the_model(images: dict[str, Path], name: str) -> None:
    raw = cluster0(images[name])
    with Image.open(images[name]) as img:
        area = img.read_header_area()
    assert area.build() == raw
    # Nothing was hidden in the raw parts: QEMU zero-fills them.
    assert not any(area.gap) and not any(area.trailing)


def test_cluster0_rebuilt_with_non_zero_gap(images: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "junk.qcow2"
    raw = bytearray(images["bitmaps"].read_bytes())
    raw[65536 - 5 : 65536] = b"junk!"
    path.write_bytes(bytes(raw))
    with Image.open(path) as img:
        area = img.read_header_area()
    assert area.gap.endswith(b"junk!")
    assert area.build() == bytes(raw[:65536])


def test_backing_file_v2_and_v3(images: dict[str, Path]) -> None:
    for name in ("v2-backing", "v3-backing"):
        with Image.open(images[name]) as img:
            area = img.read_header_area()
            assert area.backing_file is not None
            assert area.backing_file.decode() == str(images[name].with_name("base.qcow2"))
            fmt = img.extension(layout.EXT_BACKING_FORMAT)
            assert fmt is not None and fmt.data == b"qcow2"
            assert img.header.backing_file_offset == len(area.build()) - len(area.trailing) - len(
                area.backing_file
            )
    with Image.open(images["v2-backing"]) as img:
        assert img.header.version == 2 and img.header.header_length is None
        assert img.header.incompatible_features is None
        assert img.extension(layout.EXT_FEATURE_NAMES) is None  # v2: QEMU writes no table


def test_feature_name_table(images: dict[str, Path]) -> None:
    with Image.open(images["bitmaps"]) as img:
        ext = img.extension(layout.EXT_FEATURE_NAMES)
        assert ext is not None and len(ext.data) % 48 == 0
        for i in range(len(ext.data) // 48):
            blob = ext.data[i * 48 : (i + 1) * 48]
            assert layout.FeatureNameEntry.build(layout.FeatureNameEntry.parse(blob)) == blob
        names = img.feature_names()
    assert names[(layout.FEATURE_AUTOCLEAR, 0)] == "bitmaps"
    assert names[(layout.FEATURE_INCOMPATIBLE, 4)] == "extended L2 entries"
    assert names[(layout.FEATURE_COMPATIBLE, 0)] == "lazy refcounts"


def test_crypto_header_pointer(images: dict[str, Path]) -> None:
    with Image.open(images["luks"]) as img:
        assert img.header.crypt_method == 2
        ext = img.extension(layout.EXT_CRYPTO)
        assert ext is not None and ext.length == 16
        parsed = layout.CryptoHeaderPointer.parse(ext.data)
        assert layout.CryptoHeaderPointer.build(parsed) == ext.data
        assert parsed.offset % img.cluster_size == 0 and parsed.offset > 0
        assert 0 < parsed.length <= img.file_size - parsed.offset
        # The LUKS header really is there.
        assert img.pread(parsed.offset, 6) == b"LUKS\xba\xbe"


def test_external_data_file(images: dict[str, Path]) -> None:
    with Image.open(images["data-file"]) as img:
        ext = img.extension(layout.EXT_DATA_FILE)
        assert ext is not None
        assert ext.data.decode() == str(images["data-file"].with_name("data-file.raw"))
        assert img.header.incompatible & IncompatibleFeature.EXTERNAL_DATA_FILE
        assert img.header.autoclear_features & 2  # data_file_raw=on


def test_zstd_and_extended_l2(images: dict[str, Path]) -> None:
    with Image.open(images["zstd"]) as img:
        assert img.header.compression_type == 1
        assert img.header.compression_name == "zstd"
        assert img.header.incompatible & IncompatibleFeature.COMPRESSION_TYPE
    with Image.open(images["extended-l2"]) as img:
        assert img.header.incompatible & IncompatibleFeature.EXTENDED_L2
        assert img.header.compression_type == 0


def test_unknown_extension_kept_raw(images: dict[str, Path]) -> None:
    with Image.open(images["unknown-ext"]) as img:
        ext = img.extension(UNKNOWN_MAGIC)
        assert ext is not None
        assert ext.name == "unknown"
        assert ext.data == b"kept as raw bytes"
        assert ext.padding == bytes(7)
    # QEMU opens it and keeps the extension when it rewrites the header.
    copy = images["unknown-ext"].with_name("unknown-ext-rewritten.qcow2")
    copy.write_bytes(images["unknown-ext"].read_bytes())
    qemu.add_bitmap(copy, "added")
    with Image.open(copy) as img:
        ext = img.extension(UNKNOWN_MAGIC)
        assert ext is not None and ext.data == b"kept as raw bytes"
        assert img.read_header_area().build() == cluster0(copy)


def test_header_lengths_104_and_120(images: dict[str, Path]) -> None:
    with Image.open(images["header104"]) as img:
        assert img.header.header_length == 104
        assert img.header.compression_type is None and img.header.padding is None
        assert img.extensions[0].offset == 104
    with Image.open(images["header120"]) as img:
        assert img.header.header_length == 120
        assert img.header.compression_type == 0 and img.header.padding == bytes(7)
        assert img.header.unknown_fields == bytes(range(1, 9))
        assert img.extensions[0].offset == 120


@pytest.mark.parametrize("name", WITH_BITMAPS)
def test_bitmaps_extension_and_directory_roundtrip(images: dict[str, Path], name: str) -> None:
    path = images[name]
    raw = path.read_bytes()
    by_hand = qemu.bitmap_directory(path)
    with Image.open(path) as img:
        ext = img.extension(layout.EXT_BITMAPS)
        assert ext is not None
        parsed = layout.BitmapsExtension.parse(ext.data)
        assert layout.BitmapsExtension.build(parsed) == ext.data
        model = img.bitmaps_extension
        assert model is not None and model.build() == ext.data
        directory = img.read_directory()
        assert directory.error is None
        assert len(directory.entries) == parsed.nb_bitmaps == len(by_hand)
        pos = parsed.bitmap_directory_offset
        for entry, hand in zip(directory.entries, by_hand, strict=True):
            blob = raw[entry.offset : entry.offset + entry.size]
            assert entry.offset == pos == hand["entry_offset"]
            c = layout.BitmapDirectoryEntry.parse(blob)
            assert layout.BitmapDirectoryEntry.build(c) == blob
            assert BitmapEntry.from_container(c, offset=entry.offset, index=entry.index) == entry
            assert entry.build() == blob
            assert entry.display_name == hand["name"]
            assert entry.bitmap_table_offset == hand["table_offset"]
            assert entry.bitmap_table_size == hand["table_size"]
            assert entry.granularity_bits == hand["granularity_bits"]
            assert int(entry.flags) == hand["flags"]
            pos += entry.size
        assert pos - parsed.bitmap_directory_offset == parsed.bitmap_directory_size


@pytest.mark.parametrize("name", WITH_BITMAPS)
def test_bitmap_table_entries_roundtrip(images: dict[str, Path], name: str) -> None:
    raw = images[name].read_bytes()
    seen_data = 0
    with Image.open(images[name]) as img:
        for entry in img.read_directory().entries:
            table = img.read_bitmap_table(entry)
            assert len(table) == entry.bitmap_table_size
            for i, word in enumerate(table.tolist()):
                blob = raw[
                    entry.bitmap_table_offset + 8 * i : entry.bitmap_table_offset + 8 * i + 8
                ]
                assert int.from_bytes(blob, "big") == word
                offset = word & layout.BITMAP_TABLE_OFFSET_MASK
                assert word & layout.BITMAP_TABLE_RESERVED_MASK == 0
                if offset:
                    seen_data += 1
                    assert offset % img.cluster_size == 0
                    assert not word & layout.BITMAP_TABLE_ALL_ONES
    if name in ("bitmaps", "extended-l2", "cluster512", "cluster2m"):
        assert seen_data, "the writes should have produced data clusters"


@pytest.mark.parametrize("back", [None, 0, 1, 8, 9, 100, 300])
def test_cluster0_rebuilt_when_the_file_is_short(
    images: dict[str, Path], tmp_path: Path, back: int | None
) -> None:
    exts = qemu.header_extensions(images["bitmaps"])
    last_offset, _, last_data = exts[-1]
    marker_end = last_offset + 8 + (len(last_data) + 7 & ~7) + 8
    cut = 4096 if back is None else marker_end - back
    path = tmp_path / "short.qcow2"
    raw = images["bitmaps"].read_bytes()[:cut]
    path.write_bytes(raw)
    with Image.open(path) as img:
        area = img.read_header_area()
        # The extension list is whole only when the file reaches past the end marker.
        assert (img.extension_error is None) == (cut >= marker_end)
    assert area.build() == raw


def test_cluster0_rebuilt_without_an_end_marker(images: dict[str, Path], tmp_path: Path) -> None:
    # Extensions that fill the area up to the cluster's end, with no end marker (QEMU accepts it).
    path = tmp_path / "full.qcow2"
    raw = bytearray(images["cluster512"].read_bytes())
    exts = qemu.header_extensions(images["cluster512"])
    last_offset, _, last_data = exts[-1]
    end = last_offset + 8 + (len(last_data) + 7 & ~7)
    filler = 512 - end - 8
    raw[end : end + 8] = struct.pack(">II", UNKNOWN_MAGIC, filler)
    raw[end + 8 : 512] = b"\xaa" * filler
    path.write_bytes(bytes(raw))
    qemu.img_info(path)
    with Image.open(path) as img:
        assert img.extension_error is None and img.end_marker_offset is None
        assert img.extensions[-1].magic == UNKNOWN_MAGIC
        area = img.read_header_area()
    assert area.end_marker is None and area.gap == b""
    assert area.build() == bytes(raw[:512])


def test_directory_entries_decode_and_build_byte_for_byte() -> None:
    """Any entry (random fields, names, extra data, even non-zero padding) decodes to its
    fields, as an independent struct reading sees them, and builds back to its bytes."""
    import random

    rng = random.Random(9)
    for i in range(300):
        extra = rng.randbytes(rng.choice((0, 0, 1, 8, 13)))
        name = rng.randbytes(rng.randrange(0, 40))
        fixed = (
            rng.getrandbits(64),
            rng.getrandbits(32),
            rng.getrandbits(32),
            rng.getrandbits(8),
            rng.getrandbits(8),
        )
        size = layout.dir_entry_size(len(name), len(extra))
        padding = rng.randbytes(size - 24 - len(extra) - len(name))
        blob = struct.pack(">QIIBBHI", *fixed, len(name), len(extra)) + extra + name + padding
        entry = BitmapEntry.decode(blob, offset=4096 + i, index=i)
        assert (
            entry.bitmap_table_offset,
            entry.bitmap_table_size,
            int(entry.flags),
            entry.type,
            entry.granularity_bits,
        ) == fixed
        assert (entry.extra_data, entry.name, entry.padding) == (extra, name, padding)
        assert (entry.offset, entry.index, entry.size) == (4096 + i, i, size)
        assert BitmapEntry.decode(bytearray(blob), offset=0, index=0).build() == blob
    with pytest.raises(ValueError):
        BitmapEntry.decode(blob + bytes(8), offset=0, index=0)


def test_a_directory_cut_short_reads_as_qemu_reads_it(tmp_path: Path) -> None:
    """The bytes past the end of the file read as zeros, on request only."""
    path = qemu.create_image(tmp_path / "cut.qcow2", 64 << 20)
    qemu.add_bitmap(path, "b0")
    qemu.add_bitmap(path, "b1")
    qemu.qemu_io_write(path, [(0, 1 << 20)], pattern=0x44)
    with Image.open(path) as img:
        whole = img.read_directory()
        ext = img.bitmaps_extension
        assert ext is not None and whole.error is None
        end = ext.bitmap_directory_offset + ext.bitmap_directory_size
        assert end == path.stat().st_size  # the directory is the file's last bytes
    with open(path, "r+b") as f:
        f.truncate(end - 1)  # the last byte of b1's entry: padding, a zero
    with Image.open(path) as img:
        assert img.read_directory().problem == "location"
        padded = img.read_directory(past_eof_as_zeros=True)
        assert padded.error is None and padded.entries == whole.entries
    with open(path, "r+b") as f:
        f.truncate(ext.bitmap_directory_offset + 8)  # b0's table offset is all that is left
    with Image.open(path) as img:
        zeros = img.read_directory(past_eof_as_zeros=True)
        assert zeros.entries[0].bitmap_table_offset == whole.entries[0].bitmap_table_offset
        assert zeros.entries[0].bitmap_table_size == 0 and zeros.entries[0].name == b""
