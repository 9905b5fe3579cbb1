"""How ``layout.py`` declares a structure: named fields in file order, parsed and built alike.

A :class:`Schema` is a list of fields.  Each field is a big-endian integer
(:class:`Int`, or :class:`Length` when it holds the length of a later bytes
field), a constant (:class:`Magic`) or raw bytes whose size is fixed or
follows from fields before it (:class:`Raw`, :class:`Padding`).  Any field
may be conditional (``when=``): absent fields parse as None and build as
nothing.  ``build(parse(b)) == b`` for every well-formed *b*; nothing but
the magic and the length of the data is checked, because a repair tool must
read what it is about to judge (``layout.py``).

Parsing runs of fixed integers goes through one precompiled
:class:`struct.Struct` per run, so a directory of thousands of entries
parses at the speed of ``struct``.  The module uses the standard library
only: it is imported by every command, and its start-up cost counts
(bench/bench_startup.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

Values = Mapping[str, Any]
Size = int | Callable[[Values], int]


class LayoutError(ValueError):
    """Bytes that do not hold the structure: too short, or a wrong magic.

    ``field`` names the field at fault and ``offset`` is where it starts,
    relative to the first byte given to :meth:`Schema.parse`.
    """

    def __init__(self, message: str, *, field: str, offset: int) -> None:
        super().__init__(message)
        self.field = field
        self.offset = offset


class Parsed(dict):  # type: ignore[type-arg]
    """A parsed structure: its fields by name, as keys and as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Field:
    """One named field; *when* (given the fields before it) says whether it is present."""

    code: str | None = None  # struct code of a fixed-size integer field

    def __init__(self, name: str, *, when: Callable[[Values], bool] | None = None) -> None:
        self.name = name
        self.when = when

    def present(self, values: Values) -> bool:
        return self.when is None or bool(self.when(values))

    def size(self, values: Values) -> int:
        raise NotImplementedError

    def decode(self, raw: bytes) -> Any:
        return raw

    def encode(self, value: Any, values: Values) -> bytes:
        raise NotImplementedError


class Int(Field):
    """A big-endian integer: *code* is its :mod:`struct` code (``Q I i H B``).

    *default* is what :meth:`Schema.build` writes when no value is given.
    """

    def __init__(
        self,
        name: str,
        code: str,
        *,
        when: Callable[[Values], bool] | None = None,
        default: int | None = None,
    ) -> None:
        super().__init__(name, when=when)
        self.code = code
        self.default = default
        self._struct = struct.Struct(">" + code)

    def size(self, values: Values) -> int:
        return self._struct.size

    def decode(self, raw: bytes) -> int:
        return int(self._struct.unpack(raw)[0])

    def encode(self, value: Any, values: Values) -> bytes:
        return self._struct.pack(self.default if value is None else value)


class Length(Int):
    """An integer that holds the length of the bytes field *of*; built from that field."""

    def __init__(self, name: str, code: str, *, of: str) -> None:
        super().__init__(name, code)
        self.of = of

    def encode(self, value: Any, values: Values) -> bytes:
        return self._struct.pack(len(values[self.of]))


class Magic(Field):
    """Constant bytes; parsing anything else is a :class:`LayoutError`."""

    def __init__(self, name: str, value: bytes) -> None:
        super().__init__(name)
        self.value = value

    def size(self, values: Values) -> int:
        return len(self.value)

    def encode(self, value: Any, values: Values) -> bytes:
        return self.value


class Raw(Field):
    """Bytes of a fixed size, or of a size computed from the fields before them."""

    def __init__(
        self, name: str, size: Size, *, when: Callable[[Values], bool] | None = None
    ) -> None:
        super().__init__(name, when=when)
        self._size = size

    def size(self, values: Values) -> int:
        return self._size if isinstance(self._size, int) else self._size(values)

    def encode(self, value: Any, values: Values) -> bytes:
        data = bytes(value)
        if len(data) != self.size(values):
            raise ValueError(f"{self.name}: {len(data)} bytes where {self.size(values)} belong")
        return data


class Padding(Raw):
    """Raw bytes that build as zeros when no value is given (kept verbatim when one is)."""

    def encode(self, value: Any, values: Values) -> bytes:
        if value is None:
            return bytes(self.size(values))
        return super().encode(value, values)


class Schema:
    """A structure's fields in file order."""

    def __init__(self, *fields: Field) -> None:
        self.fields = fields
        self.names: tuple[str, ...] = tuple(f.name for f in fields)
        # The leading run of unconditional integers, unpacked in one call.
        lead: list[Int] = []
        for f in fields:
            if f.code is None or f.when is not None:
                break
            lead.append(f)  # type: ignore[arg-type]
        self._lead = struct.Struct(">" + "".join(f.code for f in lead if f.code))
        self._lead_names = tuple(f.name for f in lead)

    def parse(self, data: bytes | bytearray | memoryview, offset: int = 0) -> Parsed:
        """The fields of the structure at *offset* of *data*; bytes after it are ignored."""
        values = Parsed()
        pos = offset
        lead = self._lead
        if lead.size and len(data) - pos >= lead.size:
            values.update(zip(self._lead_names, lead.unpack_from(data, pos), strict=True))
            pos += lead.size
            rest = self.fields[len(self._lead_names) :]
        else:
            rest = self.fields
        for f in rest:
            if not f.present(values):
                values[f.name] = None
                continue
            size = f.size(values)
            if len(data) - pos < size:
                raise LayoutError(
                    f"{f.name} needs {size} bytes at byte {pos - offset}, "
                    f"only {max(0, len(data) - pos)} remain",
                    field=f.name,
                    offset=pos - offset,
                )
            raw = bytes(data[pos : pos + size])
            if isinstance(f, Magic) and raw != f.value:
                raise LayoutError(
                    f"{f.name}: expected {f.value!r}, found {raw!r}",
                    field=f.name,
                    offset=pos - offset,
                )
            values[f.name] = f.decode(raw)
            pos += size
        return values

    def build(self, values: Values) -> bytes:
        """The bytes of a structure holding *values* (lengths from the data they measure)."""
        known = dict(values)
        out = []
        for f in self.fields:
            if not f.present(known):
                continue
            piece = f.encode(known.get(f.name), known)
            if isinstance(f, Int):
                known[f.name] = f.decode(piece)
            out.append(piece)
        return b"".join(out)

    def sizeof(self, **assume: int) -> int:
        """Size of a structure whose fields are all of fixed size (given *assume*)."""
        end = FieldOffsets(self, **assume).end
        if end is None:
            raise TypeError("the structure has fields of variable size")
        return end


class FieldOffsets:
    """Byte offsets of a schema's fixed fields, by name: ``HEADER_FIELD.l1_size == 36``.

    Each field starts where the one before ends.  *assume* gives the fields
    that conditions and sizes depend on (the header's are those of a v3
    header as QEMU writes it).  The offsets stop at the first field whose
    size cannot be known from *assume*.
    """

    def __init__(self, schema: Schema, **assume: int) -> None:
        offsets: dict[str, int] = {}
        fields: dict[str, Field] = {}
        pos: int | None = 0
        for f in schema.fields:
            try:
                if not f.present(assume):
                    offsets[f.name] = pos  # type: ignore[assignment]
                    fields[f.name] = f
                    continue
                size = f.size(assume)
            except (KeyError, TypeError):
                offsets[f.name] = pos  # type: ignore[assignment]
                fields[f.name] = f
                pos = None  # a field of variable size: the ones after it have no fixed offset
                break
            offsets[f.name] = pos  # type: ignore[assignment]
            fields[f.name] = f
            pos += size  # type: ignore[operator]
        self._offsets = offsets
        self._fields = fields
        self.end = pos

    def build(self, name: str, value: int) -> bytes:
        """The bytes of field *name* holding *value* (for an in-place write of that field)."""
        return self._fields[name].encode(value, {})

    def __getattr__(self, name: str) -> int:
        try:
            return self._offsets[name]
        except KeyError:
            raise AttributeError(f"no fixed field {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._offsets
