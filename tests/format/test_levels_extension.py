"""The consistency-level extension's bytes: schema round trip, parser edge cases, QEMU's view."""

from __future__ import annotations

import struct

import pytest
import qemu
from hypothesis import given
from hypothesis import strategies as st

from qbitmap import levels
from qbitmap.check.levels import assess
from qbitmap.format import AutoclearFeature, Image, LevelRecord, layout, parse_levels_extension

MAGIC = 0x71626C76


def record_bytes(
    table_offset, level, level_bits, max_level, gbits, name, *, reserved=0, reserved2=0, pad=None
):
    """A record built by hand from the spec's table (independent of the schema)."""
    head = struct.pack(
        ">QiBBBBHH",
        table_offset,
        level,
        level_bits,
        max_level,
        gbits,
        reserved,
        len(name),
        reserved2,
    )
    padding = bytes(-(20 + len(name)) % 8) if pad is None else pad
    return head + name + padding


def test_constants_match_the_spec():
    assert layout.EXT_LEVELS == MAGIC
    assert layout.LEVELS_AUTOCLEAR_BIT == 63
    assert int(AutoclearFeature.QBITMAP_LEVELS) == 1 << 63
    assert layout.LEVEL_RECORD_FIXED_SIZE == 20
    assert layout.LEVEL_RECORD_FIELD.consistent_level == 8  # one aligned 4-byte write


@given(
    table_offset=st.integers(0, 2**64 - 1),
    level=st.integers(-(2**31), 2**31 - 1),
    level_bits=st.integers(0, 255),
    max_level=st.integers(0, 255),
    gbits=st.integers(0, 255),
    name=st.binary(min_size=1, max_size=1023),
    reserved=st.integers(0, 255),
    reserved2=st.integers(0, 65535),
)
def test_record_round_trip(
    table_offset, level, level_bits, max_level, gbits, name, reserved, reserved2
):
    raw = record_bytes(
        table_offset,
        level,
        level_bits,
        max_level,
        gbits,
        name,
        reserved=reserved,
        reserved2=reserved2,
    )
    assert len(raw) % 8 == 0
    c = layout.LevelRecord.parse(raw)
    assert (c.bitmap_table_offset, c.consistent_level, c.level_bits, c.max_level) == (
        table_offset,
        level,
        level_bits,
        max_level,
    )
    assert (c.granularity_bits, c.name, c.reserved, c.reserved2) == (
        gbits,
        name,
        reserved,
        reserved2,
    )
    assert layout.LevelRecord.build(c) == raw
    model = LevelRecord.from_container(c, offset=1000)
    assert model.build() == raw
    assert model.consistent_level_offset == 1008
    # consistent_level is the naturally aligned 4 bytes at offset 8.
    assert struct.unpack_from(">i", raw, 8)[0] == level


def test_nonzero_padding_survives_a_round_trip():
    raw = record_bytes(0x40000, 2, 6, 3, 16, b"b0", pad=b"\x01\x02")
    assert layout.LevelRecord.build(layout.LevelRecord.parse(raw)) == raw


def test_extension_parse_offsets_and_trailing_bytes():
    recs = [
        record_bytes(0x10000, -1, 6, 3, 16, b"a"),
        record_bytes(0x20000, 3, 6, 3, 16, b"bitmap-2"),
    ]
    data = struct.pack(">II", 1, 2) + b"".join(recs) + b"tail"
    ext = parse_levels_extension(data, offset=0x200)
    assert ext.error is None and ext.version == 1 and ext.nb_records == 2
    assert [r.name for r in ext.records] == [b"a", b"bitmap-2"]
    assert [r.offset for r in ext.records] == [0x208, 0x208 + len(recs[0])]
    assert [r.consistent_level for r in ext.records] == [-1, 3]
    assert ext.trailing == b"tail"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"\0\0\0\1", "qbitmap levels extension"),  # shorter than the 8-byte head
        (struct.pack(">II", 1, 1) + b"\0" * 12, "nb_records"),  # record cut off
        (struct.pack(">II", 1, 1) + record_bytes(0, 0, 6, 1, 16, b"abcdef")[:24], "name_size"),
    ],
)
def test_extension_parse_errors_name_the_field(data, field):
    ext = parse_levels_extension(data, offset=0x300)
    assert ext.error is not None and ext.error.field == field


def test_a_record_in_a_real_image_is_read_and_kept_by_qemu(tmp_path):
    """Written by hand (not by qbitmap); QEMU keeps the extension but clears bit 63 when it writes."""
    path = qemu.create_image(tmp_path / "a.qcow2", 1 << 30)
    qemu.add_bitmap(path, "b0")
    qemu.crash_image(path, [(0, 4096)])  # b0 is in use, as after a crashed writer
    (entry,) = qemu.bitmap_directory(path)
    top = levels.max_level((1 << 30) // 65536, 6)
    data = struct.pack(">II", 1, 1) + record_bytes(entry["table_offset"], 0, 6, top, 16, b"b0")
    qemu.append_header_extension(path, MAGIC, data)
    qemu.set_autoclear_bits(path, 1 << 63)
    with Image.open(path) as img:
        (record,) = img.read_levels().records
        assert record.name == b"b0" and record.consistent_level == 0 and record.max_level == top
        a = assess(img, img.read_directory().entries)[b"b0"]
    assert a.trusted and a.consistent_level == 0 and a.record_offset == record.offset
    qemu.qemu_io(path, "write 1M 4k")
    assert not qemu.read_autoclear(path) & (1 << 63)
    assert [d for _, m, d in qemu.header_extensions(path) if m == MAGIC] == [data]
    with Image.open(path) as img:
        a = assess(img, img.read_directory().entries)[b"b0"]
    assert a.status == "stale" and "autoclear bit 63 is clear" in a.reason
