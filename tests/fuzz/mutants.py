"""Seeded, reproducible mutations of QEMU-made qcow2 images.

A mutant is named by ``BASE:SEED`` (:class:`MutantId`): the base image (see
``bases.py``, built by QEMU's tools) and an integer seed.  :func:`make`
regenerates exactly the same bytes from the same id on every run and every
machine with the same QEMU, together with one line per edit saying what
changed (``"L2 entry @0x50008 (active): 0x8000000000060000 -> ..."``).

The edits are structure-aware -- the base is parsed with ``struct`` by
``layout.py``, independently of qbitmap -- and cover the header fields and
feature bits, the header extensions (length, magic, duplicates, the end
marker), the bitmaps extension's fields, every field of a bitmap directory
entry, bitmap names (NUL bytes, duplicates as C strings, empty, too long,
not UTF-8), extra data, bitmap table entries, L1 and L2 entries (reserved
bits, offsets past the end of the file or misaligned or onto other
structures, the COPIED flag, compressed descriptors, extended L2 subcluster
bits), the refcount table and refcount values, the snapshot table, and the
file's length; plus blind bit flips and random words in metadata.

The first edit of a mutant is ``OPERATORS[seed % len(OPERATORS)]`` so that a
run of consecutive seeds exercises every operator; a quarter of the mutants
get one or two more edits chosen at random.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bases
import layout as L
from corrupt import pack_directory

MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class MutantId:
    base: str
    seed: int

    def __str__(self) -> str:
        return f"{self.base}:{self.seed}"

    @classmethod
    def parse(cls, text: str) -> MutantId:
        base, sep, seed = text.rpartition(":")
        if not sep or base not in bases.BASES or not seed.isdigit():
            raise ValueError(
                f"mutant id {text!r} is not BASE:SEED (SEED an integer, BASE one of "
                f"{', '.join(bases.BASES)})"
            )
        return cls(base, int(seed))


@dataclass
class Mutant:
    id: MutantId
    data: bytes
    edits: list[str]  # one line per edit, in order
    operators: list[str]  # the operator of each edit

    @property
    def family(self) -> str:
        """The first operator: what this mutant is mainly about."""
        return self.operators[0]


class Mutator:
    """The bytes being mutated, the base's layout and the mutant's random source."""

    def __init__(self, data: bytes, lay: L.Layout, rng: random.Random) -> None:
        self.buf = bytearray(data)
        self.lay = lay
        self.rng = rng
        self.cs = lay.cluster_size

    # -- bytes --------------------------------------------------------------------------

    def peek(self, off: int, fmt: str) -> int:
        if off < 0 or off + struct.calcsize(fmt) > len(self.buf):
            raise _NotApplicable  # an earlier edit truncated the file
        return struct.unpack_from(fmt, self.buf, off)[0]

    def poke(self, off: int, fmt: str, value: int) -> str:
        size = struct.calcsize(fmt)
        if off < 0 or off + size > len(self.buf):
            raise _NotApplicable
        old = self.peek(off, fmt)
        value &= (1 << (8 * size)) - 1
        self.buf[off : off + size] = struct.pack(fmt, value)
        return f"{old:#x} -> {value:#x}"

    # -- values -------------------------------------------------------------------------

    def past_eof(self) -> int:
        """A cluster offset past the end of the file; most often the first one, where the next
        cluster anyone allocates by growing the file lands."""
        end = -(-len(self.buf) // self.cs) * self.cs
        return end + self.cs * self.rng.choice([0, 0, 0, 1, 7, 1 << 10, 1 << 20])

    def structure(self, exclude: tuple[str, ...] = ()) -> tuple[int, str]:
        """The offset of a cluster playing some role (another structure), and a label."""
        roles = sorted({r for rs in self.lay.roles.values() for r in rs} - set(exclude))
        role = self.rng.choice(roles)
        cluster = self.rng.choice(self.lay.clusters_with(role))
        return cluster * self.cs, f"{role} cluster {cluster}"

    def target(self, current: int, *, exclude: tuple[str, ...] = ()) -> tuple[int, str]:
        """An offset for a pointer field that used to hold *current*."""
        kind = self.rng.choice(
            ["zero", "past-eof", "huge", "misaligned", "misaligned8", "structure", "structure"]
        )
        if kind == "zero":
            return 0, "0"
        if kind == "past-eof":
            off = self.past_eof()
            return off, f"past EOF ({off:#x})"
        if kind == "huge":
            off = self.rng.choice([1 << 55, (1 << 56) - self.cs, 1 << 62])
            return off, f"huge ({off:#x})"
        if kind == "misaligned":
            step = 512 if self.cs > 512 else 256
            return current + step, f"misaligned (+{step})"
        if kind == "misaligned8":
            return current + 8, "misaligned (+8)"
        return self.structure(exclude)


class _NotApplicable(Exception):
    """The operator has nothing to act on in this base."""


Operator = Callable[[Mutator], str]


# -- header ---------------------------------------------------------------------------------


def op_header_field(m: Mutator) -> str:
    h = m.lay.header
    name, off, fmt = m.rng.choice([f for f in L.HEADER_FIELDS if not f[0].endswith("_features")])
    cur = h[name]
    r = m.rng
    values: dict[str, list[int]] = {
        "magic": [cur ^ (1 << r.randrange(32)), 0],
        "version": [0, 1, 2, 4, MAX_U32],
        "backing_file_offset": [72, 0x200, m.lay.ext_area_end - 16, m.cs - 8, m.cs, m.cs + 8],
        "backing_file_size": [1, 16, 1023, 1024, m.cs, MAX_U32],
        "cluster_bits": [0, 8, 9, 12, 16, 21, 22, 31, 32, cur - 1, cur + 1],
        "size": [
            0,
            512,
            cur - 512,
            cur + 512,
            cur - 1,
            cur * 2,
            cur * 64,
            1 << 40,
            1 << 62,
            MAX_U64,
        ],
        "crypt_method": [1, 2, 3],
        "l1_size": [0, cur - 1, cur + 1, cur * 2, 0x400000, 0x400001, MAX_U32],
        "refcount_table_clusters": [
            0,
            cur - 1,
            cur + 1,
            cur + 1000,
            8 * 1024 * 1024 // m.cs,
            8 * 1024 * 1024 // m.cs + 1,
            MAX_U32,
        ],
        "nb_snapshots": [0, cur + 1, cur + 2, 65535, 65536, MAX_U32],
        "refcount_order": [0, 1, 2, 3, 4, 5, 6, 7, 255],
        "header_length": [0, 72, 100, 103, 104, 108, 120, 1024, m.cs - 8, m.cs, m.cs + 8],
        "compression_type": [1, 2, 255],
    }
    if name in ("l1_table_offset", "refcount_table_offset", "snapshots_offset"):
        value, label = m.target(cur)
    else:
        value = r.choice([v for v in values[name] if v != cur] or [cur ^ 1])
        label = ""
    change = m.poke(off, fmt, value)
    return f"header {name} @{off:#x}: {change}" + (f" ({label})" if label else "")


def op_feature_bit(m: Mutator) -> str:
    name, off = m.rng.choice(
        [("incompatible_features", 72), ("compatible_features", 80), ("autoclear_features", 88)]
    )
    bit = m.rng.choice(
        {
            "incompatible_features": [0, 1, 2, 3, 4, 5, 63],
            "compatible_features": [0, 1, 63],
            "autoclear_features": [0, 0, 1, 2, 63],
        }[name]
    )
    cur = m.peek(off, ">Q")
    change = m.poke(off, ">Q", cur ^ (1 << bit))
    return f"header {name} bit {bit} toggled: {change}"


# -- header extensions ----------------------------------------------------------------------


def _ext(m: Mutator, prefer_bitmaps: float = 0.6) -> L.Extension:
    exts = m.lay.extensions
    if not exts:
        raise _NotApplicable
    if m.lay.bitmaps_ext is not None and m.rng.random() < prefer_bitmaps:
        return m.lay.bitmaps_ext
    return m.rng.choice(exts)


def op_ext_length(m: Mutator) -> str:
    e = _ext(m)
    room = m.lay.ext_area_end - e.offset - 8
    value = m.rng.choice(
        [0, 1, e.length - 1, e.length + 1, e.length + 8, 16, 23, 25, 32, room, room + 1, MAX_U32]
    )
    change = m.poke(e.offset + 4, ">I", value)
    return f"extension {e.magic:#010x} @{e.offset:#x} length: {change}"


def op_ext_magic(m: Mutator) -> str:
    e = _ext(m)
    value = m.rng.choice(
        [
            0,
            L.BITMAPS_EXT,
            L.FEATURE_TABLE_EXT,
            L.BACKING_FORMAT_EXT,
            L.DATA_FILE_EXT,
            L.CRYPTO_EXT,
            0x12345678,
            e.magic ^ 1,
        ]
    )
    change = m.poke(e.offset, ">I", value)
    return f"extension @{e.offset:#x} magic: {change}"


def _ext_end(m: Mutator) -> int:
    """File offset of the end marker (just after the last extension)."""
    exts = m.lay.extensions
    if not exts:
        return m.lay.header["header_length"]
    last = exts[-1]
    return last.offset + 8 + ((last.length + 7) & ~7)


def op_ext_insert(m: Mutator) -> str:
    """A second bitmaps extension, an unknown one, or garbage instead of the end marker."""
    end = _ext_end(m)
    kind = m.rng.choice(["duplicate-bitmaps", "unknown", "no-end-marker", "bitmaps-first"])
    if kind == "duplicate-bitmaps":
        e = m.lay.bitmaps_ext
        if e is None:
            raise _NotApplicable
        blob = bytes(m.buf[e.offset : e.offset + 8 + 24])
        if m.rng.random() < 0.5:  # the copy points elsewhere
            blob = blob[:24] + struct.pack(">Q", m.past_eof())
    elif kind == "unknown":
        length = m.rng.choice([0, 5, 8, 200])
        blob = struct.pack(">II", 0x71626C00 | m.rng.randrange(256), length) + bytes(
            m.rng.randrange(256) for _ in range(length)
        )
        blob += b"\0" * (-len(blob) % 8)
    elif kind == "no-end-marker":
        blob = b"\xff" * (m.lay.ext_area_end - end)
    else:  # bitmaps-first: the bitmaps extension moved before the others (QEMU does not care)
        e = m.lay.bitmaps_ext
        if e is None or len(m.lay.extensions) < 2:
            raise _NotApplicable
        exts = [x for x in m.lay.extensions if x is not e]
        area = bytes(m.buf[e.offset : e.offset + 32])
        for x in exts:
            area += bytes(m.buf[x.offset : x.offset + 8 + ((x.length + 7) & ~7)])
        start = m.lay.header["header_length"]
        m.buf[start : start + len(area)] = area
        return f"extensions reordered: bitmaps extension first @{start:#x}"
    if end + len(blob) + 8 > m.lay.ext_area_end and kind != "no-end-marker":
        raise _NotApplicable
    m.buf[end : end + len(blob)] = blob
    if kind != "no-end-marker":
        m.buf[end + len(blob) : end + len(blob) + 8] = b"\0" * 8
    return f"extension area: {kind} @{end:#x} ({len(blob)} bytes)"


def op_bitmaps_ext_field(m: Mutator) -> str:
    e = m.lay.bitmaps_ext
    if e is None:
        raise _NotApplicable
    d = e.offset + 8
    lay = m.lay
    name = m.rng.choice(["nb_bitmaps", "reserved", "dir_size", "dir_offset"])
    if name == "nb_bitmaps":
        n = lay.nb_bitmaps
        change = m.poke(d, ">I", m.rng.choice([0, n - 1, n + 1, 65535, 65536, MAX_U32]))
    elif name == "reserved":
        change = m.poke(d + 4, ">I", m.rng.choice([1, 0x80000000, MAX_U32]))
    elif name == "dir_size":
        s = lay.dir_size
        change = m.poke(
            d + 8,
            ">Q",
            m.rng.choice([0, 1, 24, s - 8, s - 1, s + 1, s + 8, m.cs, 67107840, 67107841, 1 << 63]),
        )
    else:
        value, label = m.target(lay.dir_offset)
        return f"bitmaps extension dir_offset: {m.poke(d + 16, '>Q', value)} ({label})"
    return f"bitmaps extension {name}: {change}"


# -- bitmap directory -----------------------------------------------------------------------


def _entry(m: Mutator) -> L.DirEntry:
    if not m.lay.entries:
        raise _NotApplicable
    return m.rng.choice(m.lay.entries)


def op_dir_field(m: Mutator) -> str:
    e = _entry(m)
    name, rel, fmt = m.rng.choice([f for f in L.DIR_ENTRY_FIELDS if f[0] != "flags"])
    cur = m.peek(e.offset + rel, fmt)
    r = m.rng
    label = ""
    if name == "bitmap_table_offset":
        others = [x.table_offset for x in m.lay.entries if x is not e]
        if others and r.random() < 0.25:
            value, label = r.choice(others), "another bitmap's table"
        else:
            value, label = m.target(cur)
    elif name == "bitmap_table_size":
        value = r.choice(
            [0, cur - 1, cur + 1, cur * 2, 0x8000000, 0x8000001, MAX_U32, 0x20000000 // m.cs + 1]
        )
    elif name == "type":
        value = r.choice([0, 2, 255])
    elif name == "granularity_bits":
        value = r.choice([0, 8, 9, 31, 32, 63, 64, 255, cur - 1, cur + 1])
    elif name == "name_size":
        value = r.choice([0, cur - 1, cur + 1, cur + 8, 1023, 1024, 0xFFFF])
    else:  # extra_data_size
        value = r.choice([1, 8, 16, MAX_U32])
    change = m.poke(e.offset + rel, fmt, value)
    return f"bitmap {e.name!r} (entry {e.index} @{e.offset:#x}) {name}: {change}" + (
        f" ({label})" if label else ""
    )


def op_dir_flags(m: Mutator) -> str:
    e = _entry(m)
    cur = m.peek(e.offset + 12, ">I")
    kind, value = m.rng.choice(
        [
            ("set in_use", cur | 1),
            ("set in_use", cur | 1),
            ("clear in_use", cur & ~1),
            ("toggle auto", cur ^ 2),
            ("set extra_data_compatible", cur | 4),
            ("set a reserved bit", cur | 1 << m.rng.randrange(3, 32)),
        ]
    )
    return (
        f"bitmap {e.name!r} (entry {e.index}) flags, {kind}: {m.poke(e.offset + 12, '>I', value)}"
    )


def _rewrite_directory(m: Mutator, entries: list[tuple[L.DirEntry, bytes, bytes]]) -> None:
    """Write (entry, extra, name) triples over the directory; fix nb_bitmaps and dir_size."""
    lay = m.lay
    blob = pack_directory(entries)
    # QEMU allocates whole clusters for the directory but the file may end right after it
    capacity = -(-lay.dir_size // m.cs) * m.cs
    if len(blob) > capacity or lay.bitmaps_ext is None:
        raise _NotApplicable
    span = max(len(blob), lay.dir_size)
    m.buf[lay.dir_offset : lay.dir_offset + span] = blob + b"\0" * (span - len(blob))
    d = lay.bitmaps_ext.offset + 8
    m.poke(d, ">I", len(entries))
    m.poke(d + 8, ">Q", len(blob))


def op_dir_name(m: Mutator) -> str:
    entries = [(e, e.extra, e.name) for e in m.lay.entries]
    if not entries:
        raise _NotApplicable
    i = m.rng.randrange(len(entries))
    others = [n for j, (_e, _x, n) in enumerate(entries) if j != i]
    other = m.rng.choice(others) if others else b"x"
    kind, name = m.rng.choice(
        [
            ("NUL inside", entries[i][2][:1] + b"\0" + entries[i][2][1:]),
            ("leading NUL", b"\0ig"),
            ("trailing NUL", entries[i][2] + b"\0"),
            ("same C string as another", other + b"\0x"),
            ("duplicate of another", other),
            ("empty", b""),
            ("1023 bytes", b"n" * 1023),
            ("1024 bytes", b"n" * 1024),
            ("not UTF-8", b"\xff\xfe\x80b"),
            ("terminal escape", b"\x1b]0;owned\x07\x1b[31mred\nrow"),
        ]
    )
    entries[i] = (entries[i][0], entries[i][1], name)
    _rewrite_directory(m, entries)
    return f"bitmap {m.lay.entries[i].name!r} (entry {i}) renamed, {kind}: {name!r}"


def op_dir_entries(m: Mutator) -> str:
    """Whole entries: extra data added, an entry dropped, or the order changed."""
    entries = [(e, e.extra, e.name) for e in m.lay.entries]
    if not entries:
        raise _NotApplicable
    kind = m.rng.choice(["extra-data", "extra-data-compatible", "drop", "reverse"])
    i = m.rng.randrange(len(entries))
    e = entries[i][0]
    if kind.startswith("extra-data"):
        extra = bytes(8) if m.rng.random() < 0.5 else bytes(m.rng.randrange(256) for _ in range(8))
        entry = L.DirEntry(**e.__dict__)
        if kind == "extra-data-compatible":
            entry.flags |= 4
        entries[i] = (entry, extra, e.name)
        what = f"8 bytes of extra data on bitmap {e.name!r}" + (
            " with extra_data_compatible" if kind == "extra-data-compatible" else ""
        )
    elif kind == "drop":
        del entries[i]
        if not entries:
            raise _NotApplicable
        what = f"entry of bitmap {e.name!r} removed (its clusters leak)"
    else:
        if len(entries) < 2:
            raise _NotApplicable
        entries.reverse()
        what = "entries in reverse order"
    _rewrite_directory(m, entries)
    return f"bitmap directory: {what}"


# -- bitmap tables --------------------------------------------------------------------------


def _word_mutation(
    m: Mutator, cur: int, *, reserved_bits: list[int], copied: bool, exclude: tuple[str, ...] = ()
) -> tuple[int, str]:
    """A new value for a 64-bit table word that holds a cluster offset."""
    kind = m.rng.choice(["reserved", "target", "target", "copy"] + (["copied"] if copied else []))
    if kind == "reserved":
        bit = m.rng.choice(reserved_bits)
        return cur | (1 << bit), f"reserved bit {bit} set"
    if kind == "copied":
        return cur ^ L.COPIED, "COPIED flag toggled"
    if kind == "copy":
        return -1, "copy"
    off, label = m.target(cur & L.OFFSET_MASK, exclude=exclude)
    flags = cur & L.COPIED if copied else 0
    return (off & MAX_U64) | flags, label


def op_bitmap_table(m: Mutator) -> str:
    cands = [
        e for e in m.lay.entries if e.table_size and e.table_offset + 8 * e.table_size <= len(m.buf)
    ]
    if not cands:
        raise _NotApplicable
    e = m.rng.choice(cands)
    words = [m.peek(e.table_offset + 8 * k, ">Q") for k in range(e.table_size)]
    used = [k for k, w in enumerate(words) if w]
    k = m.rng.choice(used) if used and m.rng.random() < 0.7 else m.rng.randrange(e.table_size)
    cur = words[k]
    kind = m.rng.choice(["zero", "all-ones", "ones-with-offset", "word", "word", "shared"])
    if kind == "zero":
        value, label = 0, "unallocated (reads as zeros)"
    elif kind == "all-ones":
        value, label = 1, "all ones, no cluster"
    elif kind == "ones-with-offset":
        value, label = (cur or m.past_eof()) | 1, "all-ones bit with an offset"
    elif kind == "shared":
        others = [
            m.peek(x.table_offset + 8 * j, ">Q")
            for x in m.lay.entries
            for j in range(x.table_size)
            if x.table_offset + 8 * j + 8 <= len(m.buf)
        ]
        others = [w for w in others if w and w != cur]
        if not others:
            raise _NotApplicable
        value, label = m.rng.choice(others), "another bitmap data cluster (shared)"
    else:
        value, label = _word_mutation(
            m, cur, reserved_bits=list(range(1, 9)) + list(range(56, 64)), copied=False
        )
        if value < 0:
            raise _NotApplicable
    change = m.poke(e.table_offset + 8 * k, ">Q", value)
    return f"bitmap {e.name!r} table entry {k} @{e.table_offset + 8 * k:#x}: {change} ({label})"


# -- L1 / L2 --------------------------------------------------------------------------------


def op_l1_entry(m: Mutator) -> str:
    tables = [t for t in m.lay.l1_tables if t[1]]
    active = [t for t in tables if t[2]]
    off, size, is_active = active[0] if active and m.rng.random() < 0.7 else m.rng.choice(tables)
    words = [m.peek(off + 8 * i, ">Q") for i in range(size)]
    used = [i for i, w in enumerate(words) if w]
    i = m.rng.choice(used) if used and m.rng.random() < 0.85 else m.rng.randrange(size)
    cur = words[i]
    value, label = _word_mutation(
        m, cur, reserved_bits=list(range(1, 9)) + list(range(56, 63)), copied=True
    )
    if value < 0:
        others = [w for w in words if w and w != cur]
        if not others:
            raise _NotApplicable
        value, label = m.rng.choice(others), "another L1 entry's L2 table (shared)"
    change = m.poke(off + 8 * i, ">Q", value)
    which = "active" if is_active else "snapshot"
    return f"{which} L1 entry {i} @{off + 8 * i:#x}: {change} ({label})"


def op_l2_entry(m: Mutator) -> str:
    entries = m.lay.l2_entries
    if not entries:
        raise _NotApplicable
    active = [e for e in entries if e.active]
    e = m.rng.choice(active if active and m.rng.random() < 0.7 else entries)
    cur = m.peek(e.offset, ">Q")
    where = f"L2 entry @{e.offset:#x} ({'active' if e.active else 'snapshot only'})"
    if m.lay.extended_l2 and m.rng.random() < 0.3:
        bitmap = m.peek(e.offset + 8, ">Q")
        sub = m.rng.randrange(32)
        kind, value = m.rng.choice(
            [
                ("alloc and zero bit of one subcluster", bitmap | (1 << sub) | (1 << (32 + sub))),
                ("every subcluster allocated", bitmap | MAX_U32),
                ("no subcluster allocated", bitmap & ~MAX_U32),
                ("every subcluster zero", (bitmap & ~MAX_U32) | (MAX_U32 << 32)),
            ]
        )
        return f"{where} subcluster bitmap, {kind}: {m.poke(e.offset + 8, '>Q', value)}"
    if cur & L.COMPRESSED:
        shift = 62 - (m.lay.cluster_bits - 8)
        count_mask = ((1 << (m.lay.cluster_bits - 8)) - 1) << shift
        kind, value = m.rng.choice(
            [
                ("sector count 0", cur & ~count_mask),
                (
                    "sector count +1",
                    (cur & ~count_mask) | ((cur & count_mask) + (1 << shift)) & count_mask,
                ),
                ("sector count max", cur | count_mask),
                ("offset past EOF", (cur & ~((1 << shift) - 1)) | m.past_eof() + 100),
                ("COPIED set", cur | L.COPIED),
                ("compressed bit cleared", cur & ~L.COMPRESSED),
                ("offset onto another structure", (cur & ~((1 << shift) - 1)) | m.structure()[0]),
            ]
        )
        return f"{where} compressed descriptor, {kind}: {m.poke(e.offset, '>Q', value)}"
    kind = m.rng.choice(["word", "word", "zero-flag", "compressed-bit", "unallocate", "shared"])
    if kind == "zero-flag":
        value, label = cur ^ 1, "zero flag toggled"
    elif kind == "compressed-bit":
        value, label = cur | L.COMPRESSED, "compressed bit set"
    elif kind == "unallocate":
        value, label = 0, "unallocated (the data cluster leaks)"
    elif kind == "shared":
        others = [x.value for x in entries if x.value != cur and not x.value & L.COMPRESSED]
        if not others:
            raise _NotApplicable
        value, label = m.rng.choice(others), "another entry's data cluster (shared)"
    else:
        value, label = _word_mutation(
            m, cur, reserved_bits=list(range(1, 9)) + list(range(56, 62)), copied=True
        )
        if value < 0:
            raise _NotApplicable
    return f"{where}: {m.poke(e.offset, '>Q', value)} ({label})"


# -- refcounts ------------------------------------------------------------------------------


def op_reftable_entry(m: Mutator) -> str:
    h = m.lay.header
    off = h["refcount_table_offset"]
    used = [i for i, b in enumerate(m.lay.refcount_blocks) if b]
    n = h["refcount_table_clusters"] * m.cs // 8
    i = m.rng.choice(used) if used and m.rng.random() < 0.8 else m.rng.randrange(min(n, 64))
    cur = m.peek(off + 8 * i, ">Q")
    kind = m.rng.choice(["word", "word", "reserved", "copy"])
    if kind == "reserved":
        bit = m.rng.randrange(0, 9)
        value, label = cur | (1 << bit), f"reserved bit {bit} set"
    elif kind == "copy":
        others = [b for b in m.lay.refcount_blocks if b and b != cur]
        if not others:
            raise _NotApplicable
        value, label = m.rng.choice(others), "another refcount block (shared)"
    else:
        value, label = m.target(cur)
    return (
        f"refcount table entry {i} @{off + 8 * i:#x}: {m.poke(off + 8 * i, '>Q', value)} ({label})"
    )


def op_refcount(m: Mutator) -> str:
    lay = m.lay
    roles = sorted({r for rs in lay.roles.values() for r in rs} | {"past-eof"})
    role = m.rng.choice(roles)
    if role == "past-eof":
        cluster = -(-len(m.buf) // m.cs) + m.rng.randrange(3)
    else:
        cluster = m.rng.choice(lay.clusters_with(role))
    cur = L.get_refcount(lay, m.buf, cluster)
    if cur is None:
        raise _NotApplicable
    top = (1 << lay.refcount_bits) - 1
    value = m.rng.choice(
        sorted({0, max(cur - 1, 0), min(cur + 1, top), top, min(2, top)} - {cur}) or [0]
    )
    L.set_refcount(lay, m.buf, cluster, value)
    return f"refcount of cluster {cluster} ({role}, {lay.refcount_bits}-bit): {cur} -> {value}"


# -- snapshots ------------------------------------------------------------------------------


def op_snapshot(m: Mutator) -> str:
    if not m.lay.snapshots:
        raise _NotApplicable
    s = m.rng.choice(m.lay.snapshots)
    name, rel, fmt = m.rng.choice(
        [f for f in L.SNAPSHOT_FIELDS if f[0] not in ("date_sec", "date_nsec")]
    )
    cur = m.peek(s.offset + rel, fmt)
    label = ""
    if name == "l1_table_offset":
        active_l1 = m.lay.header["l1_table_offset"]
        if m.rng.random() < 0.2:
            value, label = active_l1, "the active L1 table"
        else:
            value, label = m.target(cur)
    else:
        value = m.rng.choice(
            {
                "l1_size": [0, cur - 1, cur + 1, 0x400001, MAX_U32],
                "id_str_size": [0, cur + 1, 0xFFFF],
                "name_size": [0, cur + 1, 0xFFFF],
                "vm_clock_nsec": [MAX_U64],
                "vm_state_size": [1, MAX_U32],
                "extra_data_size": [0, 8, 15, 17, MAX_U32],
            }[name]
        )
    change = m.poke(s.offset + rel, fmt, value)
    return f"snapshot {s.index} @{s.offset:#x} {name}: {change}" + (f" ({label})" if label else "")


# -- the file -------------------------------------------------------------------------------


def op_truncate(m: Mutator) -> str:
    n = len(m.buf)
    cs = m.cs
    kind, size = m.rng.choice(
        [
            ("empty", 0),
            ("header only", 72),
            ("v3 header only", 104),
            ("half the first cluster", cs // 2),
            ("first cluster", cs),
            ("mid-file, cluster boundary", m.rng.randrange(1, max(2, n // cs)) * cs),
            ("last cluster cut", (n - 1) // cs * cs),
            ("one byte short", n - 1),
            ("one sector short", n - 512),
            ("grown by one byte", n + 1),
            ("grown by three clusters", n + 3 * cs),
        ]
    )
    size = max(0, size)
    if size <= n:
        del m.buf[size:]
    else:
        m.buf.extend(bytes(size - n))
    return f"file {kind}: {n} -> {size} bytes"


def _metadata_region(m: Mutator) -> tuple[int, int, str]:
    lay = m.lay
    kinds = ["header"]
    if lay.bitmaps_ext is not None:
        kinds += ["bitmaps-ext", "bitmap-dir", "bitmap-dir"]
    kinds += ["bitmap-table", "l1", "l2", "reftable", "refblock", "snaptable", "anywhere"]
    kind = m.rng.choice(kinds)
    if kind == "header":
        return 0, max(lay.header["header_length"], 104), kind
    if kind == "bitmaps-ext":
        return lay.bitmaps_ext.offset, 32, kind  # type: ignore[union-attr]
    if kind == "bitmap-dir":
        return lay.dir_offset, lay.dir_size, kind
    if kind == "anywhere":
        return 0, len(m.buf), kind
    clusters = lay.clusters_with(kind)
    if not clusters:
        return 0, len(m.buf), "anywhere"
    c = m.rng.choice(clusters)
    return c * m.cs, m.cs, f"{kind} cluster {c}"


def op_bit_flips(m: Mutator) -> str:
    start, length, where = _metadata_region(m)
    flips = []
    for _ in range(m.rng.randint(1, 4)):
        pos = start + m.rng.randrange(max(1, length))
        if pos >= len(m.buf):
            continue
        bit = m.rng.randrange(8)
        m.buf[pos] ^= 1 << bit
        flips.append(f"{pos:#x}.{bit}")
    if not flips:
        raise _NotApplicable
    return f"bit flips in {where}: {', '.join(flips)}"


def op_random_word(m: Mutator) -> str:
    start, length, where = _metadata_region(m)
    pos = (start + m.rng.randrange(max(1, length))) & ~7
    if pos + 8 > len(m.buf):
        raise _NotApplicable
    value = m.rng.getrandbits(64)
    return f"random word in {where} @{pos:#x}: {m.poke(pos, '>Q', value)}"


OPERATORS: dict[str, Operator] = {
    "header-field": op_header_field,
    "feature-bit": op_feature_bit,
    "ext-length": op_ext_length,
    "ext-magic": op_ext_magic,
    "ext-insert": op_ext_insert,
    "bitmaps-ext-field": op_bitmaps_ext_field,
    "dir-field": op_dir_field,
    "dir-flags": op_dir_flags,
    "dir-name": op_dir_name,
    "dir-entries": op_dir_entries,
    "bitmap-table": op_bitmap_table,
    "l1-entry": op_l1_entry,
    "l2-entry": op_l2_entry,
    "reftable-entry": op_reftable_entry,
    "refcount": op_refcount,
    "snapshot": op_snapshot,
    "truncate": op_truncate,
    "bit-flips": op_bit_flips,
    "random-word": op_random_word,
}
OPERATOR_NAMES = tuple(OPERATORS)

_LAYOUTS: dict[str, L.Layout] = {}


def base_layout(base: str, cache_dir: Path | None = None) -> L.Layout:
    if base not in _LAYOUTS:
        _LAYOUTS[base] = L.parse(bases.build(base, cache_dir))
    return _LAYOUTS[base]


def make(mid: MutantId, cache_dir: Path | None = None) -> Mutant:
    """Regenerate mutant *mid*: the same bytes and edit lines on every call."""
    data = bases.build(mid.base, cache_dir)
    lay = base_layout(mid.base, cache_dir)
    rng = random.Random(f"qbitmap-fuzz/{mid.base}/{mid.seed}")
    m = Mutator(data, lay, rng)
    count = rng.choices([1, 2, 3], weights=[75, 17, 8])[0]
    first = OPERATOR_NAMES[mid.seed % len(OPERATOR_NAMES)]
    edits: list[str] = []
    ops: list[str] = []
    name = first
    attempts = 0
    while len(edits) < count and attempts < 50:
        attempts += 1
        before = bytes(m.buf)
        try:
            edit = OPERATORS[name](m)
        except _NotApplicable:
            edit = None
        if edit is not None and m.buf != before:
            edits.append(edit)
            ops.append(name)
        else:  # an edit that changed nothing is no edit
            m.buf[:] = before
        name = rng.choice(OPERATOR_NAMES)
    if not edits:
        raise RuntimeError(f"no operator applied to {mid}")
    return Mutant(mid, bytes(m.buf), edits, ops)


def ids(count: int, seed: int = 0, base_names: tuple[str, ...] | None = None) -> list[MutantId]:
    """*count* consecutive mutant ids from *seed*: operator = seed mod the operator count, base
    = (seed div the operator count) mod the base count, so every (operator, base) pair comes
    up once in every ``len(OPERATORS) * len(BASES)`` consecutive seeds."""
    names = base_names or tuple(bases.BASES)
    n_ops = len(OPERATOR_NAMES)
    return [MutantId(names[(s // n_ops) % len(names)], s) for s in range(seed, seed + count)]


def write(mid: MutantId, dest: Path, cache_dir: Path | None = None) -> Mutant:
    """Regenerate mutant *mid* into the file *dest* (for a human to look at)."""
    mutant = make(mid, cache_dir)
    Path(dest).write_bytes(mutant.data)
    return mutant
