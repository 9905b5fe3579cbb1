"""The level math of qbitmap.levels and the Tracker's LevelState, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbitmap import levels
from qbitmap.track.state import LevelState, bit_range


def brute_level(bits: list[int], level: int, top: int, level_bits: int) -> list[int]:
    """Level *level* of a bit list, straight from the definition."""
    g = (1 << level_bits) ** (top - level)
    return [int(any(bits[j : j + g])) for j in range(0, len(bits), g)]


def pack(bits: list[int]) -> np.ndarray:
    flat = np.zeros(-(-len(bits) // 8) * 8, dtype=np.uint8)
    flat[: len(bits)] = bits
    return np.packbits(flat, bitorder="little")


def unpack(data: np.ndarray, nbits: int) -> list[int]:
    return np.unpackbits(data, bitorder="little")[:nbits].tolist()


# -- max_level ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbits", "level_bits", "expected"),
    [
        (0, 6, 0),
        (1, 6, 0),
        (64, 6, 0),
        (65, 6, 1),
        (4096, 6, 1),
        (4097, 6, 2),
        # 1 TiB at 64 KiB granularity: 2^24 bits, 2^24 / 64^3 = 64 bits at level 0.
        (1 << 24, 6, 3),
        ((1 << 24) + 1, 6, 4),
        (2, 1, 0),
        (3, 1, 1),
        (1 << 20, 1, 19),
        (1 << 16, 16, 0),
        ((1 << 16) + 1, 16, 1),
    ],
)
def test_max_level_examples(nbits: int, level_bits: int, expected: int) -> None:
    assert levels.max_level(nbits, level_bits) == expected


@given(st.integers(0, 1 << 40), st.integers(1, 16))
def test_max_level_is_the_smallest_with_at_most_f_bits_at_level_0(
    nbits: int, level_bits: int
) -> None:
    f = 1 << level_bits
    m = levels.max_level(nbits, level_bits)
    assert -(-nbits // f**m) <= f
    if m > 0:
        assert -(-nbits // f ** (m - 1)) > f


@pytest.mark.parametrize("level_bits", [0, 17, -1])
def test_max_level_rejects_level_bits_outside_1_to_16(level_bits: int) -> None:
    with pytest.raises(ValueError, match="level_bits"):
        levels.max_level(100, level_bits)


# -- widen and recover ------------------------------------------------------------------

bitlists = st.integers(1, 700).flatmap(
    lambda n: st.lists(st.integers(0, 1), min_size=n, max_size=n)
)


@settings(max_examples=300)
@given(bitlists, st.sampled_from([1, 2, 4, 8, 16, 64, 256, 1024]))
def test_widen_matches_the_definition(bits: list[int], group: int) -> None:
    n = len(bits)
    expected = []
    for start in range(0, n, group):
        hit = int(any(bits[start : start + group]))
        expected.extend([hit] * min(group, n - start))
    out = levels.widen(pack(bits), n, group)
    assert unpack(out, n) == expected
    # Bits past nbits stay clear.
    assert np.unpackbits(out, bitorder="little")[n:].sum() == 0


@settings(max_examples=300)
@given(bitlists, st.integers(1, 4), st.data())
def test_recover_covers_t_whenever_the_invariant_holds(
    bits: list[int], level_bits: int, data
) -> None:
    """Spec "Recovery", safety: invariant at level c => recovered bitmap covers T."""
    n = len(bits)
    top = levels.max_level(n, level_bits)
    c = data.draw(st.integers(-1, top), label="c")
    t = pack(bits)
    # Build a D satisfying the invariant at level c: every level-c group with a
    # bit of T holds at least one bit of D (any bit); plus random noise.
    d_bits = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="noise")
    if c >= 0:
        g = (1 << level_bits) ** (top - c)
        for start in range(0, n, g):
            if any(bits[start : start + g]) and not any(d_bits[start : start + g]):
                pos = data.draw(st.integers(start, min(n, start + g) - 1), label="witness")
                d_bits[pos] = 1
    if c == top:
        d_bits = [a | b for a, b in zip(bits, d_bits, strict=True)]
    for k in range(c + 1):
        t_k, d_k = brute_level(bits, k, top, level_bits), brute_level(d_bits, k, top, level_bits)
        assert all(dk >= tk for tk, dk in zip(t_k, d_k, strict=True))
    out = levels.recover(pack(d_bits), n, c, top, level_bits)
    assert not (t & ~out).any()


def test_recover_loses_a_change_when_the_invariant_is_broken() -> None:
    # The property above is not vacuous: claim level 0 while level 0 changed.
    n, level_bits = 64, 2  # F = 4, max_level 2, level-0 groups of 16 bits
    t = pack([1 if i == 40 else 0 for i in range(n)])
    d = pack([1 if i == 3 else 0 for i in range(n)])
    out = levels.recover(d, n, 0, levels.max_level(n, level_bits), level_bits)
    assert (t & ~out).any()


def test_recover_full_and_none() -> None:
    n = 21
    d = pack([1 if i in (2, 20) else 0 for i in range(n)])
    top = levels.max_level(n, 2)
    assert unpack(levels.recover(d, n, top, top, 2), n) == unpack(d, n)
    full = levels.recover(d, n, -1, top, 2)
    assert unpack(full, n) == [1] * n
    assert full[-1] == 0b11111  # the 3 bits past nbits are clear


def brute_coarsest_new_level(bits: list[int], first: int, end: int, level_bits: int) -> int | None:
    n = len(bits)
    top = levels.max_level(n, level_bits)
    after = list(bits)
    after[first:end] = [1] * (end - first)
    for k in range(top + 1):
        if brute_level(bits, k, top, level_bits) != brute_level(after, k, top, level_bits):
            return k
    return None


@settings(max_examples=500)
@given(bitlists, st.integers(1, 5), st.data())
def test_coarsest_new_level_matches_brute_force(bits: list[int], level_bits: int, data) -> None:
    n = len(bits)
    state = LevelState(pack(bits), n, level_bits, cluster_size=16)
    for _ in range(4):
        first = data.draw(st.integers(0, n), label="first")
        end = data.draw(st.integers(first, min(n, first + 80)), label="end")
        assert state.coarsest_new_level(first, end) == brute_coarsest_new_level(
            bits, first, end, level_bits
        )
        state.set_range(first, end)
        bits[first:end] = [1] * (end - first)
        assert unpack(state.bits, n) == bits
        for k in range(state.max_level + 1):
            assert state.level(k).astype(int).tolist() == brute_level(
                bits, k, state.max_level, level_bits
            )


def test_lowered_level_uses_x_le_c_not_the_2015_c_gt_x() -> None:
    # F = 4, 64 bits: levels 0 (16-bit groups), 1 (4-bit groups), 2 (bits).
    state = LevelState(pack([1] + [0] * 63), 64, 2, cluster_size=8)
    assert state.max_level == 2
    assert state.consistent_level == 2
    # Bit 1 changes only the finest level: X = 2 = c, so c must drop to 1.
    assert state.coarsest_new_level(1, 2) == 2
    assert state.lowered_level(1, 2) == 1
    state.consistent_level = 1
    state.set_range(1, 2)
    # Bit 5 is in a new 4-bit group: X = 1 = c, drop to 0.
    assert state.lowered_level(5, 6) == 0
    state.consistent_level = 0
    state.set_range(5, 6)
    # Bit 6 changes only level 2 > c = 0: no record update.
    assert state.lowered_level(6, 7) is None
    # Bit 40: a new 16-bit group, X = 0 = c: drop to -1.
    assert state.lowered_level(40, 41) == -1
    state.consistent_level = -1
    # Nothing can go lower.
    assert state.lowered_level(63, 64) is None
    # Setting bits already set changes no level at all.
    assert state.coarsest_new_level(0, 2) is None


def test_changed_bytes_and_dirty_clusters() -> None:
    state = LevelState(np.zeros(64, dtype=np.uint8), 512, 6, cluster_size=16)
    assert not state.has_changes
    assert state.set_range(0, 3) == 1
    assert state.set_range(3, 8) == 0  # same byte again
    assert state.set_range(8 * 20, 8 * 40) == 20
    assert state.changed_bytes == 21
    assert state.dirty_clusters == [0, 1, 2]
    state.mark_flushed()
    assert state.changed_bytes == 0 and state.dirty_clusters == []
    assert state.set_range(0, 8) == 0  # already set: nothing changed


def test_bit_range() -> None:
    assert bit_range(0, 4096, 65536, 1 << 30) == (0, 1)
    assert bit_range(65535, 2, 65536, 1 << 30) == (0, 2)
    assert bit_range(65536, 65536, 65536, 1 << 30) == (1, 2)
    assert bit_range(100, 0, 65536, 1 << 30) == (0, 0)
    with pytest.raises(ValueError):
        bit_range((1 << 30) - 1, 2, 65536, 1 << 30)
