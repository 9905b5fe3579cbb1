"""Stored refcounts looked up by cluster (qbitmap.format.entries.stored_refcounts_of)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qbitmap.format.entries import stored_refcounts_of

INT64_MAX = (1 << 63) - 1


@given(
    st.lists(st.integers(0, (1 << 64) - 1), max_size=40),
    st.lists(st.integers(-3, 50), max_size=40),
)
def test_stored_refcounts_of_clusters(stored, clusters):
    refcounts = np.array(stored, dtype=np.uint64)
    rc, inside = stored_refcounts_of(refcounts, np.array(clusters, dtype=np.int64))
    # By definition: a cluster the refcount structure covers has its stored refcount,
    # saturated at 2^63 - 1 (no image has more references); any other reads as 0.
    expected = [min(stored[c], INT64_MAX) if 0 <= c < len(stored) else 0 for c in clusters]
    assert rc.dtype == np.int64
    assert rc.tolist() == expected
    assert inside.tolist() == [0 <= c < len(stored) for c in clusters]
