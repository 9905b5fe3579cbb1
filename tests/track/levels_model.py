"""A pure in-memory model of a tracked bitmap on a disk that can crash.

``ModelBackend`` implements the Tracker's Backend with a durable state (the
record, autoclear bit 63, in_use, the data clusters ``D``) and a list of
unflushed writes.  Every write and every flush is one numbered operation; at
operation ``crash_at`` the model raises :class:`Crash` before doing it, and
what survives is the durable state plus, if asked, a random subset of the
unflushed writes applied in a random order (a disk may persist any of them).

``recover()`` then does what ``qbitmap recover --mode level`` does with the
surviving state: trust the record only under the spec's rules, apply the
recovery rule, or keep ``D`` when the bitmap is not in use.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qbitmap import levels


class Crash(Exception):
    """The simulated machine stopped here."""


@dataclass
class Durable:
    record_level: int | None = None  # None: no record
    bit63: bool = False
    in_use: bool = False
    data: dict[int, bytes] = field(default_factory=dict)  # cluster index -> bytes


class ModelBackend:
    """Backend of the Tracker over an in-memory durable state."""

    def __init__(
        self,
        base: np.ndarray,
        nbits: int,
        level_bits: int,
        cluster_size: int,
        *,
        crash_at: int | None = None,
        persist_some: random.Random | None = None,
    ) -> None:
        self.nbits = nbits
        self.level_bits = level_bits
        self.max_level = levels.max_level(nbits, level_bits)
        self.cluster_size = cluster_size
        self.durable = Durable()
        for i in range(0, len(base), cluster_size):
            self.durable.data[i // cluster_size] = bytes(base[i : i + cluster_size])
        self.pending: list[tuple[str, object]] = []
        self.ops = 0
        self.crash_at = crash_at
        self.persist_some = persist_some
        self.crashed = False
        self.log: list[str] = []

    # -- operations ------------------------------------------------------------------

    def _op(self, name: str) -> None:
        if self.crashed:
            raise Crash("already crashed")
        if self.crash_at is not None and self.ops == self.crash_at:
            self.crashed = True
            self._lose_unflushed()
            raise Crash(f"crash at operation {self.ops} ({name})")
        self.ops += 1
        self.log.append(name)

    def _write(self, key: str, value: object) -> None:
        self._op(f"write {key}")
        self.pending.append((key, value))

    def _flush(self) -> None:
        self._op("flush")
        for key, value in self.pending:
            self._apply(key, value)
        self.pending.clear()

    def _apply(self, key: str, value: object) -> None:
        d = self.durable
        if key == "record":
            d.record_level = value  # type: ignore[assignment]
        elif key == "bit63":
            d.bit63 = bool(value)
        elif key == "in_use":
            d.in_use = bool(value)
        elif key.startswith("data "):
            d.data[int(key[5:])] = value  # type: ignore[assignment]
        else:  # pragma: no cover - programming error
            raise AssertionError(key)

    def _lose_unflushed(self) -> None:
        rng = self.persist_some
        if rng is not None and self.pending:
            survivors = [w for w in self.pending if rng.random() < 0.5]
            rng.shuffle(survivors)
            for key, value in survivors:
                self._apply(key, value)
        self.pending.clear()

    # -- Backend ---------------------------------------------------------------------

    def begin(self, consistent_level: int) -> None:
        # The real header rewrite puts record and bit 63 in one write.
        self._op("write header (record + bit 63)")
        self.pending.append(("record", consistent_level))
        self.pending.append(("bit63", True))
        self._flush()
        self._write("in_use", True)
        self._flush()

    def set_level(self, consistent_level: int) -> None:
        self._write("record", consistent_level)
        self._flush()

    def store(self, bits: np.ndarray, clusters: Sequence[int]) -> None:
        cs = self.cluster_size
        for i in clusters:
            self._write(f"data {i}", bytes(bits[i * cs : (i + 1) * cs]))
        self._flush()

    def end(self) -> None:
        self._write("in_use", False)
        self._flush()
        self._op("write header (no record, no bit 63)")
        self.pending.append(("record", None))
        self.pending.append(("bit63", False))
        self._flush()

    def abandon(self) -> None:
        pass

    # -- after the crash -------------------------------------------------------------

    def disk_bits(self) -> np.ndarray:
        nbytes = -(-self.nbits // 8)
        out = np.zeros(nbytes, dtype=np.uint8)
        for i, data in self.durable.data.items():
            lo = i * self.cluster_size
            out[lo : lo + len(data)] = np.frombuffer(data, dtype=np.uint8)[: nbytes - lo]
        return out

    def recover(self) -> tuple[np.ndarray, str]:
        """The bitmap ``qbitmap recover`` would produce, and which rule it used."""
        d = self.durable
        bits = self.disk_bits()
        if not d.in_use:
            return bits, "consistent"
        if d.record_level is not None and d.bit63 and -1 <= d.record_level <= self.max_level:
            return (
                levels.recover(bits, self.nbits, d.record_level, self.max_level, self.level_bits),
                f"level {d.record_level}",
            )
        return levels.recover(bits, self.nbits, -1, self.max_level, self.level_bits), "full"


def bits_from_ranges(nbits: int, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """A packed bitmap with bits ``[first, end)`` set for every range."""
    flat = np.zeros(-(-nbits // 8) * 8, dtype=np.uint8)
    for first, end in ranges:
        flat[first:end] = 1
    return np.packbits(flat, bitorder="little")


def missing_bits(required: np.ndarray, recovered: np.ndarray) -> int:
    """How many bits of *required* *recovered* lacks (0 means it covers them all)."""
    lost = np.unpackbits(required & ~recovered, bitorder="little")
    return int(lost.sum())
