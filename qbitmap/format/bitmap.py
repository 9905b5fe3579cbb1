"""Bitmap data: from table entries to bits, dirty byte counts and extents.

docs/interop/qcow2.rst "Bitmap table" and "Bitmap data": entry *i* of the
table describes data cluster *i* of the bitmap's serialized bits.  An entry
with an offset points at a data cluster; an entry without one reads as all
zeros, or all ones when bit 0 is set.  Bit *k* covers guest bytes
``[k*g, (k+1)*g)`` and sits in byte ``k // 8`` at bit ``k % 8`` (LSB first,
as QEMU's hbitmap serializer stores little-endian words).  Bits past the end
of the disk are ignored.

Data is processed one bounded chunk at a time, so memory stays a small
multiple of the chunk size whatever the table claims.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from qbitmap.errors import ImageFormatError
from qbitmap.format import layout
from qbitmap.format.entries import bitmap_table_entries
from qbitmap.format.image import Image
from qbitmap.format.layout import BME_MAX_PHYS_SIZE
from qbitmap.format.model import BitmapEntry

# Contiguous data clusters are read together, up to this many bytes per read.
READ_BATCH_BYTES = 1 << 20

_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def popcount(buf: np.ndarray) -> int:
    """Number of set bits in a uint8 array."""
    if hasattr(np, "bitwise_count"):
        # Counted 64 bits at a time: a quarter of the time of byte by byte.
        whole = len(buf) // 8 * 8
        total = int(np.bitwise_count(buf[whole:]).sum(dtype=np.uint64))
        if whole:
            total += int(np.bitwise_count(buf[:whole].view(np.uint64)).sum(dtype=np.uint64))
        return total
    return int(_POPCOUNT[buf].sum(dtype=np.uint64))


def group_any(bits: np.ndarray, nbits: int, group: int, *, chunk: int = 1 << 20) -> np.ndarray:
    """Whether each group of *group* consecutive bits has a set bit: one bool per group.

    *bits* is packed LSB first (``ceil(nbits / 8)`` bytes), *group* a power of
    two; the last group may be short.  The one group-OR of qbitmap: coarser
    bitmaps (recover --reference at a bitmap's granularity), consistency
    levels, level recovery.  Works *chunk* bytes at a time, so memory stays
    bounded for bitmaps of hundreds of MiB.
    """
    ngroups = -(-nbits // group)
    out = np.empty(ngroups, dtype=bool)
    if group >= 8:
        gbytes = group // 8
        step = max(1, chunk // gbytes)
        for start in range(0, ngroups, step):
            stop = min(ngroups, start + step)
            part = bits[start * gbytes : stop * gbytes]
            if len(part) < (stop - start) * gbytes:  # the last, short group
                part = np.concatenate(
                    [part, np.zeros((stop - start) * gbytes - len(part), np.uint8)]
                )
            out[start:stop] = part.reshape(-1, gbytes).any(axis=1)
        return out
    per = 8 // group  # groups per byte
    for start in range(0, -(-nbits // 8), chunk):
        unpacked = np.unpackbits(bits[start : start + chunk], bitorder="little")
        got = unpacked.reshape(-1, group).any(axis=1)
        n = min(len(got), ngroups - start * per)
        out[start * per : start * per + n] = got[:n]
    return out


def dirty_bytes_of(geo: Geometry, bits: np.ndarray) -> int:
    """Guest bytes covered by the set bits of a whole packed bitmap, clipped to the disk's end."""
    total = popcount(bits) * geo.granularity
    last = geo.nbits - 1
    if geo.nbits and geo.virtual_size % geo.granularity and bits[last // 8] >> (last % 8) & 1:
        total -= geo.granularity - geo.virtual_size % geo.granularity
    return total


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """The distinct values of a 1-D integer array, ascending (what ``np.unique`` returns).

    Sort-based, as ``np.unique`` was before numpy 2.3: the hash-based path
    there first asks ``np.ma.is_masked``, which imports all of ``numpy.ma``
    (several milliseconds at start-up) for a question about plain arrays.
    """
    values = np.sort(np.asarray(values).ravel())
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes of a bitmap of *granularity* bytes per bit over a *virtual_size* disk."""

    virtual_size: int
    granularity: int
    cluster_size: int

    @property
    def nbits(self) -> int:
        return -(-self.virtual_size // self.granularity)

    @property
    def nbytes(self) -> int:
        return -(-self.nbits // 8)

    @property
    def bits_per_cluster(self) -> int:
        return self.cluster_size * 8

    @property
    def table_size(self) -> int:
        """The exact bitmap_table_size QEMU requires (load_bitmap_data)."""
        return -(-self.nbytes // self.cluster_size)

    @property
    def bytes_per_cluster(self) -> int:
        """Guest bytes one data cluster covers."""
        return self.bits_per_cluster * self.granularity

    def bit_range_bytes(self, first_bit: int, end_bit: int) -> tuple[int, int]:
        """Guest byte range ``(start, length)`` of bits ``[first_bit, end_bit)``, clipped."""
        start = first_bit * self.granularity
        end = min(end_bit * self.granularity, self.virtual_size)
        return start, end - start


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bits ``[first_bit, first_bit + nbits)`` of a bitmap.

    ``kind`` is "zero", "ones" or "data"; for "data", ``data`` holds the
    bytes (LSB-first), already cut to ``nbits`` with the bits past ``nbits``
    in the last byte cleared.
    """

    first_bit: int
    nbits: int
    kind: str
    data: np.ndarray | None = None


def geometry_of(image: Image, entry: BitmapEntry) -> Geometry:
    return Geometry(image.virtual_size, entry.granularity, image.cluster_size)


def table_entry_problem(word: int, cluster_size: int) -> str | None:
    """Why a bitmap table entry is invalid (QEMU's check_table_entry), or None."""
    classes = bitmap_table_entries(np.array([word], dtype=np.uint64), cluster_size)
    if classes.reserved[0]:
        return f"reserved bits {word & layout.BITMAP_TABLE_RESERVED_MASK:#x} are set"
    if classes.ones_with_offset[0]:
        return "the all-ones bit is set together with a data cluster offset"
    if classes.unaligned[0]:
        return f"data cluster offset {int(classes.offsets[0]):#x} is not cluster aligned"
    return None


def iter_chunks(
    image: Image, entry: BitmapEntry, table: np.ndarray | None = None
) -> Iterator[Chunk]:
    """Yield the bitmap's bits cluster by cluster (contiguous clusters batched).

    Table entries past the disk's end are ignored; missing entries (a table
    shorter than the disk needs) read as zeros.  Raises ImageFormatError for
    an invalid table entry or a data cluster outside the file.
    """
    geo = geometry_of(image, entry)
    if table is None:
        check_data_size(image, entry)
        # Entries past the disk's end are ignored: never read them.
        table = image.read_bitmap_table(entry, limit=geo.table_size)
    cs = image.cluster_size
    bpc = geo.bits_per_cluster
    used = min(len(table), geo.table_size)
    i = 0
    while i < used:
        word = int(table[i])
        first_bit = i * bpc
        nbits = min(bpc, geo.nbits - first_bit)
        problem = table_entry_problem(word, cs)
        if problem is not None:
            raise ImageFormatError(
                f"bitmap {entry.display_name!r} table entry {i}: {problem}",
                offset=entry.bitmap_table_offset + 8 * i,
                field="bitmap table entry",
            )
        offset = word & layout.BITMAP_TABLE_OFFSET_MASK
        if offset == 0:
            kind = "ones" if word & layout.BITMAP_TABLE_ALL_ONES else "zero"
            yield Chunk(first_bit, nbits, kind)
            i += 1
            continue
        # Batch data clusters that follow each other in the file.
        j = i + 1
        while (
            j < used
            and (j - i + 1) * cs <= READ_BATCH_BYTES
            and int(table[j]) == offset + (j - i) * cs
        ):
            j += 1
        data = image.read(
            offset,
            (j - i) * cs,
            what=f"data cluster of bitmap {entry.display_name!r}",
            field=f"bitmap table entry {i}",
        )
        buf = np.frombuffer(data, dtype=np.uint8)
        total_bits = min((j - i) * bpc, geo.nbits - first_bit)
        yield Chunk(first_bit, total_bits, "data", _clip(buf, total_bits))
        i = j
    if used < geo.table_size:
        # A table shorter than the disk: the rest reads as zeros.  One chunk,
        # not one per missing entry (a lying virtual size may imply billions).
        first_bit = used * bpc
        yield Chunk(first_bit, geo.nbits - first_bit, "zero")


def bits_past_end(image: Image, geo: Geometry, table: np.ndarray) -> tuple[int, int] | None:
    """Bits set past the end of the disk in the bitmap's last data cluster, if any.

    Returns ``(cluster_offset, end_offset)``: the file offsets of that data
    cluster and of its byte holding the disk's last bit (the first that may
    hold a bit past the end); None when no such bit is set,
    or when the table is short or its last entry has no data cluster inside
    the file.  A cluster cut short by the end of the file reads as zeros past
    it, as QEMU reads it.
    """
    if geo.table_size == 0 or len(table) < geo.table_size:
        return None
    last = geo.table_size - 1
    classes = bitmap_table_entries(table[last : last + 1], image.cluster_size)
    offset = int(classes.offsets[0])
    if not classes.data[0] or offset >= image.file_size:
        return None
    used_bits = geo.nbits - last * geo.bits_per_cluster
    if used_bits >= geo.bits_per_cluster:
        return None
    data = np.frombuffer(
        image.pread(offset, image.cluster_size).ljust(image.cluster_size, b"\0"), np.uint8
    )
    first_byte, rem = divmod(used_bits, 8)
    partial = int(data[first_byte]) >> rem if rem else 0
    if not partial and not np.count_nonzero(data[first_byte + (1 if rem else 0) :]):
        return None
    return offset, offset + first_byte


def check_data_size(image: Image, entry: BitmapEntry) -> None:
    """Refuse a bitmap whose data would exceed QEMU's 512 MiB (BME_MAX_PHYS_SIZE).

    Only the table entries the disk uses count (``min(bitmap_table_size,
    geometry.table_size)``), so this bounds what :func:`iter_chunks` reads
    whatever the header and directory claim.
    """
    geo = geometry_of(image, entry)
    used = min(entry.bitmap_table_size, geo.table_size)
    if used * image.cluster_size > BME_MAX_PHYS_SIZE:
        raise ImageFormatError(
            f"bitmap {entry.display_name!r} would need {used} data clusters "
            f"({used * image.cluster_size} bytes), more than QEMU's limit of "
            f"{BME_MAX_PHYS_SIZE} bytes of bitmap data",
            offset=entry.field_offset("bitmap_table_size"),
            field="bitmap_table_size",
        )


def _clip(buf: np.ndarray, nbits: int) -> np.ndarray:
    """Cut *buf* to *nbits* bits, clearing the unused high bits of the last byte."""
    nbytes = -(-nbits // 8)
    buf = buf[:nbytes]
    rem = nbits % 8
    if rem and buf[-1] >> rem:
        buf = buf.copy()
        buf[-1] &= (1 << rem) - 1
    return buf


def dirty_bytes(geo: Geometry, chunks: Iterator[Chunk]) -> int:
    """Guest bytes covered by set bits, clipped to the virtual size."""
    bits = 0
    last_set = False
    for chunk in chunks:
        if chunk.kind == "ones":
            bits += chunk.nbits
            last_bit_set = True
        elif chunk.kind == "data":
            assert chunk.data is not None
            bits += popcount(chunk.data)
            last = chunk.first_bit + chunk.nbits - 1
            rel = last - chunk.first_bit
            last_bit_set = bool(chunk.data[rel // 8] >> (rel % 8) & 1)
        else:
            last_bit_set = False
        if chunk.first_bit + chunk.nbits == geo.nbits:
            last_set = last_bit_set
    total = bits * geo.granularity
    if last_set and geo.virtual_size % geo.granularity:
        total -= geo.granularity - geo.virtual_size % geo.granularity
    return total


def dirty_bytes_below(geo: Geometry, chunks: Iterator[Chunk], offsets: Sequence[int]) -> list[int]:
    """Guest bytes marked dirty in ``[0, offset)`` for each of the sorted *offsets*.

    *offsets* are guest byte offsets in ``[0, virtual_size]``, ascending, a
    few hundred at most (Python ints: a damaged header's virtual size may
    not fit in int64).  Exact at any offset, granule boundary or not: ``offset`` lies in
    granule ``k = offset // granularity``, and the dirty bytes below it are
    ``granularity`` times the set bits below ``k``, plus ``offset %
    granularity`` when bit ``k`` is set.  The differences between
    consecutive offsets are the dirty bytes of the ranges between them (the
    cells of ``dump``'s map).  Streams the chunks: memory is that of one
    chunk whatever the bitmap's size.
    """
    # Granule indices fit in int64 whatever the offsets (granularity >= 512 bytes).
    granule = np.array([o // geo.granularity for o in offsets], dtype=np.int64)
    below = np.zeros(len(offsets), dtype=np.int64)  # set bits below each granule
    bit = np.zeros(len(offsets), dtype=bool)  # the granule's own bit
    done = 0  # offsets[:done] are answered
    before = 0  # set bits below the current chunk
    for chunk in chunks:
        end_bit = chunk.first_bit + chunk.nbits
        stop = int(np.searchsorted(granule, end_bit, side="left"))
        here = slice(done, stop)
        rel = granule[here] - chunk.first_bit
        if chunk.kind == "ones":
            below[here] = before + rel
            bit[here] = True
            before += chunk.nbits
        elif chunk.kind == "data":
            assert chunk.data is not None
            counts = _POPCOUNT[chunk.data]
            # Set bits in the whole bytes below each position, then in its byte's low bits.
            cumulative = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=cumulative[1:])
            byte_index = rel // 8
            low = (rel % 8).astype(np.uint8)
            partial = chunk.data[byte_index] & ((np.uint8(1) << low) - np.uint8(1))
            below[here] = before + cumulative[byte_index] + _POPCOUNT[partial]
            bit[here] = (chunk.data[byte_index] >> low) & 1
            before += int(cumulative[-1])
        else:
            below[here] = before
        done = stop
    # Offsets at or past the last granule's end (the disk's end on a granule boundary).
    below[done:] = before
    return [
        count * geo.granularity + (offset % geo.granularity if is_set else 0)
        for count, offset, is_set in zip(below.tolist(), offsets, bit.tolist(), strict=True)
    ]


def bit_runs(chunks: Iterator[Chunk]) -> Iterator[tuple[int, int]]:
    """Merged runs of set bits as ``(first_bit, end_bit)``, in order."""
    pending: tuple[int, int] | None = None
    for chunk in chunks:
        if chunk.kind == "zero":
            continue
        if chunk.kind == "ones":
            runs: Iterator[tuple[int, int]] = iter(
                [(chunk.first_bit, chunk.first_bit + chunk.nbits)]
            )
        else:
            assert chunk.data is not None
            runs = _data_runs(chunk)
        for start, end in runs:
            if pending is not None and pending[1] == start:
                pending = (pending[0], end)
                continue
            if pending is not None:
                yield pending
            pending = (start, end)
    if pending is not None:
        yield pending


# Bits are unpacked this many bytes at a time (8 bytes of transient memory per
# bitmap byte), so memory stays bounded for bitmaps of hundreds of MiB.  Any
# value from 1 up gives the same runs (tests vary it to cross piece edges).
UNPACK_BYTES = 1 << 18


def _data_runs(chunk: Chunk) -> Iterator[tuple[int, int]]:
    data = chunk.data
    assert data is not None
    for pos in range(0, len(data), UNPACK_BYTES):
        part = data[pos : pos + UNPACK_BYTES]
        if not part.any():
            continue
        base = chunk.first_bit + pos * 8
        if part.all() and (part == 0xFF).all():
            yield base, base + len(part) * 8
            continue
        bits = np.unpackbits(part, bitorder="little")
        edges = np.flatnonzero(np.diff(bits, prepend=np.uint8(0), append=np.uint8(0)))
        starts = edges[0::2] + base
        ends = edges[1::2] + base
        yield from zip(starts.tolist(), ends.tolist(), strict=True)


def extents(geo: Geometry, chunks: Iterator[Chunk]) -> Iterator[tuple[int, int]]:
    """Dirty guest byte ranges ``(start, length)``: merged, sorted, clipped."""
    for first, end in bit_runs(chunks):
        start, length = geo.bit_range_bytes(first, end)
        if length > 0:
            yield start, length


def read_bits(image: Image, entry: BitmapEntry, table: np.ndarray | None = None) -> np.ndarray:
    """The whole bitmap as a uint8 array of ``geometry.nbytes`` bytes.

    Bounded by QEMU's 512 MiB limit on bitmap data; callers that only need
    counts or extents should stream :func:`iter_chunks` instead.
    """
    geo = geometry_of(image, entry)
    if geo.nbytes > BME_MAX_PHYS_SIZE:
        raise ImageFormatError(
            f"bitmap {entry.display_name!r} would need {geo.nbytes} bytes of data, more than "
            "QEMU's limit of 512 MiB",
            offset=entry.field_offset("granularity_bits"),
            field="granularity_bits",
        )
    out = np.zeros(geo.nbytes, dtype=np.uint8)
    for chunk in iter_chunks(image, entry, table):
        lo = chunk.first_bit // 8
        if chunk.kind == "ones":
            hi = -(-(chunk.first_bit + chunk.nbits) // 8)
            out[lo:hi] = 0xFF
        elif chunk.kind == "data":
            assert chunk.data is not None
            out[lo : lo + len(chunk.data)] = chunk.data
    rem = geo.nbits % 8
    if rem and geo.nbytes:
        out[-1] &= (1 << rem) - 1
    return out


def _set_bit_positions(words: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Stream positions (``index * 64 + bit``) of the set bits of *words*, sorted.

    Peels the lowest set bit of every word per round (``x & -x``; its index
    is the popcount of ``low - 1``), so the rounds needed are the most set
    bits any one word has; sparse bitmaps take one or two.
    """
    found: list[np.ndarray] = []
    one = np.uint64(1)
    base = index * 64
    while words.size:
        low = words & (~words + one)
        found.append(base + _bit_index(low))
        words = words ^ low
        keep = words != 0
        if not keep.any():
            break
        words = words[keep]
        base = base[keep]
    if not found:
        return _EMPTY
    if len(found) == 1:
        return found[0]
    return np.sort(np.concatenate(found))


def _bit_index(powers: np.ndarray) -> np.ndarray:
    """log2 of uint64 powers of two, as int64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(powers - np.uint64(1)).astype(np.int64)
    return (np.frexp(powers.astype(np.float64))[1] - 1).astype(np.int64)


def _byte_runs(data: np.ndarray, base_bit: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits in LSB-first *data*, as absolute ``(first_bits, end_bits)`` int64 arrays.

    Works on 64-bit words (little-endian, so bit ``b`` of word ``w`` is
    stream bit ``64 * w + b``) and only on the non-zero ones: the cost
    follows the number of runs rather than the bitmap's size.
    """
    if len(data) % 8:
        padded = np.zeros(len(data) + (-len(data) % 8), dtype=np.uint8)
        padded[: len(data)] = data
        data = padded
    words = data.view("<u8")
    nz = np.flatnonzero(words != 0)  # much faster than flatnonzero(words) on uint64
    if nz.size == 0:
        return _EMPTY, _EMPTY
    w = words[nz]
    last = len(words) - 1
    prev = words[np.maximum(nz - 1, 0)]
    prev[nz == 0] = 0
    nxt = words[np.minimum(nz + 1, last)]
    nxt[nz == last] = 0
    s63, one = np.uint64(63), np.uint64(1)
    # A run starts at a set bit whose predecessor (the bit below, or the top
    # bit of the previous word) is clear; it ends after a set bit whose
    # successor is clear.
    starts = w & ~((w << one) | (prev >> s63))
    ends = w & ~((w >> one) | ((nxt & one) << s63))
    nz64 = nz.astype(np.int64)
    hit = starts != 0
    first_bits = _set_bit_positions(starts[hit], nz64[hit])
    hit = ends != 0
    end_bits = _set_bit_positions(ends[hit], nz64[hit]) + 1
    return first_bits + base_bit, end_bits + base_bit


_EMPTY = np.zeros(0, dtype=np.int64)


def _piece_runs(chunks: Iterator[Chunk]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Runs of set bits per chunk piece (a "ones" chunk, or up to ``UNPACK_BYTES`` of data).

    Each block's runs are maximal within its piece; a run that crosses a piece
    or chunk boundary comes out as two runs, one ending and one starting there.
    """
    for chunk in chunks:
        if chunk.kind == "zero" or chunk.nbits <= 0:
            continue
        if chunk.kind == "ones":
            yield (
                np.array([chunk.first_bit], np.int64),
                np.array([chunk.first_bit + chunk.nbits], np.int64),
            )
            continue
        data = chunk.data
        assert data is not None
        for pos in range(0, len(data), UNPACK_BYTES):
            firsts, ends = _byte_runs(data[pos : pos + UNPACK_BYTES], chunk.first_bit + pos * 8)
            if firsts.size:
                yield firsts, ends


def run_blocks(chunks: Iterator[Chunk]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Merged runs of set bits, in order, as blocks of ``(first_bits, end_bits)`` int64 arrays.

    A block holds the runs of one piece of at most ``UNPACK_BYTES`` bytes of
    bitmap data, so memory follows that size and never the number of runs; the
    last run of each block is held back until the next block shows whether
    it goes on there.  No block is empty.
    """
    carry: tuple[int, int] | None = None
    for firsts, ends in _piece_runs(chunks):
        if carry is not None:
            if int(firsts[0]) == carry[1]:
                firsts[0] = carry[0]  # the held-back run goes on in this block
            else:
                firsts = np.concatenate((np.array([carry[0]], np.int64), firsts))
                ends = np.concatenate((np.array([carry[1]], np.int64), ends))
        carry = (int(firsts[-1]), int(ends[-1]))
        if len(firsts) > 1:
            yield firsts[:-1], ends[:-1]
    if carry is not None:
        yield np.array([carry[0]], np.int64), np.array([carry[1]], np.int64)


def run_arrays(chunks: Iterator[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    """Merged runs of set bits as two int64 arrays ``(first_bits, end_bits)``, in order.

    The vectorised counterpart of :func:`bit_runs`: same runs, no Python
    object per run.  Holds every run at once; :func:`run_blocks` streams them.
    """
    firsts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for first_bits, end_bits in run_blocks(chunks):
        firsts.append(first_bits)
        ends.append(end_bits)
    if not firsts:
        return _EMPTY, _EMPTY
    return np.concatenate(firsts), np.concatenate(ends)


def _byte_extents(
    geo: Geometry, first_bits: np.ndarray, end_bits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Runs of bits as guest byte ranges ``(starts, lengths)``, clipped to the virtual size.

    Works in place on *first_bits* and *end_bits* (the callers' own arrays);
    object arrays of Python ints when a byte offset could overflow int64.
    """
    if (geo.nbits + 1) * geo.granularity >= 1 << 63:
        first_bits = first_bits.astype(object)
        end_bits = end_bits.astype(object)
        starts = first_bits * geo.granularity
        return starts, np.minimum(end_bits * geo.granularity, geo.virtual_size) - starts
    starts = np.multiply(first_bits, geo.granularity, out=first_bits)
    lengths = np.multiply(end_bits, geo.granularity, out=end_bits)
    np.minimum(lengths, geo.virtual_size, out=lengths)
    np.subtract(lengths, starts, out=lengths)
    return starts, lengths


def extent_blocks(
    geo: Geometry, chunks: Iterator[Chunk]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Dirty guest byte ranges, merged, sorted and clipped, as blocks of ``(starts, lengths)``.

    The streaming form of :func:`extent_arrays`: peak memory is that of one
    block (see :func:`run_blocks`) however many ranges the bitmap has.
    """
    for first_bits, end_bits in run_blocks(chunks):
        yield _byte_extents(geo, first_bits, end_bits)


def extent_arrays(geo: Geometry, chunks: Iterator[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    """Dirty guest byte ranges as ``(starts, lengths)`` arrays: merged, sorted, clipped.

    The vectorised counterpart of :func:`extents`.  int64 arrays, or object
    arrays of Python ints when a byte offset could overflow int64 (absurd
    geometries from damaged headers).  Holds every range at once:
    :func:`extent_blocks` streams them.
    """
    return _byte_extents(geo, *run_arrays(chunks))
