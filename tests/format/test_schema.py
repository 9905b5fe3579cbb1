"""The schema engine behind layout.py: parse and build alike, errors that name the field.

Real images (made by QEMU) are parsed and rebuilt byte for byte in
test_format_roundtrip.py; here are the engine's own rules on bytes made by
hand: conditional fields, lengths rebuilt from the data they measure,
verbatim padding, and where a short or foreign input fails.
"""

from __future__ import annotations

import struct

import pytest

from qbitmap.format import layout
from qbitmap.format.schema import (
    FieldOffsets,
    Int,
    LayoutError,
    Length,
    Magic,
    Padding,
    Raw,
    Schema,
)

Record = Schema(
    Magic("magic", b"RC"),
    Int("kind", "B"),
    Length("name_size", "H", of="name"),
    Int("extra", "I", when=lambda v: v["kind"] >= 2),
    Raw("name", lambda v: v["name_size"]),
    Padding("padding", lambda v: -(5 + v["name_size"] + (4 if v["kind"] >= 2 else 0)) % 8),
)


def test_parse_reads_every_field_in_order_and_conditionals_as_none() -> None:
    one = b"RC" + b"\x01" + struct.pack(">H", 3) + b"abc"
    parsed = Record.parse(one)
    assert parsed == {
        "magic": b"RC",
        "kind": 1,
        "name_size": 3,
        "extra": None,
        "name": b"abc",
        "padding": b"",
    }
    assert parsed.name == b"abc"  # fields are attributes too
    two = b"RC" + b"\x02" + struct.pack(">HI", 2, 0xDEADBEEF) + b"xy" + b"\x07" * 5
    parsed = Record.parse(two + b"trailing bytes are not the structure's")
    assert (parsed.extra, parsed.name, parsed.padding) == (0xDEADBEEF, b"xy", b"\x07" * 5)
    assert Record.build(parsed) == two  # non-zero padding kept verbatim


def test_build_takes_lengths_from_the_data_and_zero_pads_by_default() -> None:
    built = Record.build({"kind": 2, "extra": 7, "name": b"hello", "name_size": 999})
    assert built == b"RC\x02" + struct.pack(">HI", 5, 7) + b"hello" + bytes(2)
    assert Record.parse(built).name_size == 5


def test_short_input_names_the_field_and_where_it_starts() -> None:
    whole = Record.build({"kind": 2, "extra": 7, "name": b"hello"})
    for cut in range(len(whole)):
        with pytest.raises(LayoutError) as caught:
            Record.parse(whole[:cut])
        field = caught.value.field
        start = FieldOffsets(Record, kind=2, name_size=5)
        assert getattr(start, field) == caught.value.offset <= cut
        assert field in str(caught.value)


def test_a_foreign_magic_is_refused_at_its_offset() -> None:
    with pytest.raises(LayoutError) as caught:
        Record.parse(b"XY\x01\x00\x00", 0)
    assert (caught.value.field, caught.value.offset) == ("magic", 0)
    with pytest.raises(LayoutError) as caught:
        Record.parse(b"....XY\x01\x00\x00", 4)
    assert caught.value.offset == 0  # relative to where the structure starts


def test_parse_at_an_offset_of_a_larger_buffer() -> None:
    one = Record.build({"kind": 1, "name": b"n"})
    assert Record.parse(b"\xff" * 11 + one, 11).name == b"n"


def test_field_offsets_stop_at_the_first_field_of_unknown_size() -> None:
    offsets = FieldOffsets(Record)
    assert (offsets.magic, offsets.kind, offsets.name_size) == (0, 2, 3)
    assert offsets.extra == 5  # its presence depends on kind: known start, unknown size
    assert "name" not in offsets
    with pytest.raises(AttributeError):
        _ = offsets.name
    assert FieldOffsets(Record, kind=1, name_size=2).name == 5


def test_the_qcow2_header_declaration_matches_qemus_offsets() -> None:
    # docs/interop/qcow2.rst gives these byte offsets; QEMU writes a 112-byte v3 header.
    spec = {
        "version": 4,
        "backing_file_offset": 8,
        "backing_file_size": 16,
        "cluster_bits": 20,
        "size": 24,
        "crypt_method": 32,
        "l1_size": 36,
        "l1_table_offset": 40,
        "refcount_table_offset": 48,
        "refcount_table_clusters": 56,
        "nb_snapshots": 60,
        "snapshots_offset": 64,
        "incompatible_features": 72,
        "compatible_features": 80,
        "autoclear_features": 88,
        "refcount_order": 96,
        "header_length": 100,
        "compression_type": 104,
    }
    assert {name: getattr(layout.HEADER_FIELD, name) for name in spec} == spec
    assert layout.HEADER_FIELD.end == layout.QEMU_HEADER_LENGTH
    v2 = layout.Header.parse(layout.MAGIC + struct.pack(">I", 2) + bytes(64))
    assert v2.header_length is None and v2.compression_type is None
    assert len(layout.Header.build(v2)) == layout.V2_HEADER_LENGTH
