"""A Disk that keeps every write in memory: the engine of ``--dry-run``.

Reads see the file with the pending writes laid over it, so the allocator
and the planner make exactly the decisions a real run would, and the write
log says what would be written where.  Nothing ever reaches the file (the
dry run also opens it read-only).
"""

from __future__ import annotations

from qbitmap.store.disk import Disk, DiskStats


class OverlayDisk:
    """Writes go to an in-memory overlay; ``flush`` only counts."""

    def __init__(self, inner: Disk) -> None:
        self.inner = inner
        self.pending: list[tuple[int, bytes]] = []
        self.stats = DiskStats()

    def pread(self, offset: int, length: int) -> bytes:
        base = self.inner.pread(offset, length)
        if not self.pending:
            return base
        buf = bytearray(base)
        end = offset + length
        for w_offset, data in self.pending:
            w_end = w_offset + len(data)
            if w_end <= offset or w_offset >= end:
                continue
            if min(w_end, end) - offset > len(buf):
                buf.extend(bytes(min(w_end, end) - offset - len(buf)))
            lo = max(offset, w_offset)
            hi = min(end, w_end)
            buf[lo - offset : hi - offset] = data[lo - w_offset : hi - w_offset]
        return bytes(buf)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self.stats.write_log.append((offset, len(data)))
        self.pending.append((offset, bytes(data)))

    def flush(self) -> None:
        self.stats.flushes += 1

    def size(self) -> int:
        size = self.inner.size()
        for offset, data in self.pending:
            size = max(size, offset + len(data))
        return size
