"""The one declaration of each structure: offsets derived from the schemas, the model in step."""

from __future__ import annotations

import dataclasses

from qbitmap.format import layout
from qbitmap.format.model import HEADER_FIELDS, Header


def test_header_offsets_are_the_specs():
    # docs/interop/qcow2.rst "Header": the byte ranges of the fixed fields.
    expected = {
        "magic": 0, "version": 4, "backing_file_offset": 8, "backing_file_size": 16,
        "cluster_bits": 20, "size": 24, "crypt_method": 32, "l1_size": 36,
        "l1_table_offset": 40, "refcount_table_offset": 48, "refcount_table_clusters": 56,
        "nb_snapshots": 60, "snapshots_offset": 64, "incompatible_features": 72,
        "compatible_features": 80, "autoclear_features": 88, "refcount_order": 96,
        "header_length": 100, "compression_type": 104, "padding": 105, "unknown_fields": 112,
    }  # fmt: skip
    assert {name: getattr(layout.HEADER_FIELD, name) for name in expected} == expected


def test_entry_offsets_are_the_specs():
    entry = layout.BITMAP_DIR_ENTRY_FIELD
    assert (entry.bitmap_table_offset, entry.bitmap_table_size, entry.flags) == (0, 8, 12)
    assert (entry.type, entry.granularity_bits, entry.name_size) == (16, 17, 18)
    assert (entry.extra_data_size, layout.BITMAP_DIR_ENTRY_FIXED_SIZE) == (20, 24)
    ext = layout.BITMAPS_EXTENSION_FIELD
    assert (ext.nb_bitmaps, ext.reserved32, ext.bitmap_directory_size) == (0, 4, 8)
    assert ext.bitmap_directory_offset == 16 and layout.BITMAPS_EXTENSION_SIZE == 24
    assert layout.SNAPSHOT_FIELD.extra_data_size == 36 and layout.SNAPSHOT_ENTRY_FIXED_SIZE == 40
    assert layout.EXTENSION_FIELD.length == 4 and layout.EXTENSION_HEADER_SIZE == 8


def test_unknown_fields_have_no_offset():
    try:
        _ = layout.BITMAP_DIR_ENTRY_FIELD.no_such_field
    except AttributeError as exc:
        assert "no_such_field" in str(exc)
    else:
        raise AssertionError("a misspelt field name must fail")


def test_field_bytes_build_from_the_schema():
    assert layout.BITMAP_DIR_ENTRY_FIELD.build("flags", 3) == b"\0\0\0\x03"
    assert layout.LEVEL_RECORD_FIELD.build("consistent_level", -1) == b"\xff\xff\xff\xff"


def test_the_header_model_names_the_schemas_fields():
    assert tuple(f.name for f in dataclasses.fields(Header)) == HEADER_FIELDS
    assert HEADER_FIELDS == layout.Header.names
