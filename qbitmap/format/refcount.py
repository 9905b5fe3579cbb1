"""Reading refcounts ("Host cluster management").

Two levels: a contiguous refcount table of 8-byte entries, each pointing at a
one-cluster refcount block of ``cluster_size * 8 / refcount_bits`` entries.
Entries of 1, 2 and 4 bits are packed LSB first; 8 bits and wider are
big-endian integers.
"""

from __future__ import annotations

import numpy as np

from qbitmap.errors import ImageFormatError
from qbitmap.format import layout
from qbitmap.format.entries import decode_refcount_block
from qbitmap.format.image import QCOW_MAX_REFTABLE_SIZE, Image


class Refcounts:
    """Read-only view of an image's refcount structure."""

    def __init__(self, image: Image) -> None:
        self.image = image
        header = image.header
        self.order = header.effective_refcount_order
        if self.order > 6:
            raise ImageFormatError(
                f"refcount_order is {self.order}, the largest allowed is 6",
                offset=96,
                field="refcount_order",
            )
        self.cluster_size = image.cluster_size
        self.entries_per_block = image.cluster_size * 8 >> self.order
        self.max_refcount = (1 << (1 << self.order)) - 1
        table_bytes = header.refcount_table_clusters * image.cluster_size
        if table_bytes > QCOW_MAX_REFTABLE_SIZE:
            raise ImageFormatError(
                f"refcount table of {header.refcount_table_clusters} clusters exceeds QEMU's "
                "limit of 8 MiB",
                offset=56,
                field="refcount_table_clusters",
            )
        if header.refcount_table_offset % image.cluster_size:
            raise ImageFormatError(
                f"refcount_table_offset {header.refcount_table_offset:#x} is not cluster aligned",
                offset=48,
                field="refcount_table_offset",
            )
        data = image.read(
            header.refcount_table_offset, table_bytes, what="refcount table",
            field="refcount_table_offset",
        )
        self.table_offset = header.refcount_table_offset
        self.table = np.frombuffer(data, dtype=">u8").astype(np.uint64)
        self._blocks: dict[int, np.ndarray] = {}

    def block_offset(self, table_index: int) -> int:
        if table_index >= len(self.table):
            return 0
        return int(self.table[table_index]) & layout.REFT_OFFSET_MASK

    def block(self, table_index: int) -> np.ndarray | None:
        """Refcounts of the block at *table_index*, or None if it is not allocated."""
        if table_index in self._blocks:
            return self._blocks[table_index]
        offset = self.block_offset(table_index)
        if offset == 0:
            return None
        if offset % self.cluster_size:
            raise ImageFormatError(
                f"refcount block offset {offset:#x} is not cluster aligned",
                offset=self.table_offset + 8 * table_index,
                field="refcount table entry",
            )
        data = self.image.read(
            offset, self.cluster_size, what=f"refcount block {table_index}",
            field="refcount table entry",
        )
        values = decode_refcount_block(data, self.order)
        self._blocks[table_index] = values
        return values

    def refcount(self, cluster_index: int) -> int:
        table_index, block_index = divmod(cluster_index, self.entries_per_block)
        block = self.block(table_index)
        return 0 if block is None else int(block[block_index])

    @property
    def covered_clusters(self) -> int:
        """Clusters the refcount table can describe at all."""
        return len(self.table) * self.entries_per_block

    def refcounts(self, first_cluster: int, count: int) -> np.ndarray:
        """Refcounts of clusters ``[first_cluster, first_cluster + count)`` as uint64."""
        out = np.zeros(count, dtype=np.uint64)
        pos = first_cluster
        end = first_cluster + count
        while pos < end:
            table_index, block_index = divmod(pos, self.entries_per_block)
            take = min(end - pos, self.entries_per_block - block_index)
            block = self.block(table_index) if table_index < len(self.table) else None
            if block is not None:
                out[pos - first_cluster : pos - first_cluster + take] = block[
                    block_index : block_index + take
                ]
            pos += take
        return out
