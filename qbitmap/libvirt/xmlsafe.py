"""XML from files qbitmap did not write, parsed without trusting them.

libvirt's own files never carry a document type declaration, so one is
refused outright: no DTD means no entity can be declared, and with no
declared entity there is nothing to expand (billion laughs, quadratic
blow-up) and nothing external to fetch.  Only the five predefined entities
and character references remain, which expat resolves itself.  Files are
read up to :data:`MAX_XML_SIZE` bytes.  Every problem is an
:class:`XmlProblem` naming the file, never an exception from the parser.
"""

from __future__ import annotations

import os
import stat
from xml.etree.ElementTree import Element, TreeBuilder
from xml.parsers import expat

#: Largest XML file read.  A domain definition with hundreds of devices is
#: well under 1 MiB; a checkpoint file holds one domain definition.
MAX_XML_SIZE = 16 * 1024 * 1024


class XmlProblem(Exception):
    """A file that is not XML qbitmap will read; the message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Refused(Exception):
    pass


def _refuse(what: str):  # type: ignore[no-untyped-def]
    def handler(*_args: object) -> None:
        raise _Refused(what)

    return handler


def parse_xml_bytes(data: bytes, *, source: str) -> Element:
    """Parse *data* (read from *source*, used in messages) into an element tree.

    Raises XmlProblem for malformed XML, a DTD, an entity declaration or an
    undefined entity.
    """
    builder = TreeBuilder()
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse("a document type declaration (DTD)")
    parser.EntityDeclHandler = _refuse("an entity declaration")
    parser.UnparsedEntityDeclHandler = _refuse("an entity declaration")
    parser.ExternalEntityRefHandler = _refuse("an external entity reference")
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except _Refused as exc:
        raise XmlProblem(
            source,
            f"has {exc} at line {parser.CurrentLineNumber}; libvirt never writes one and "
            "qbitmap does not read DTDs or entities",
        ) from None
    except expat.ExpatError as exc:
        reason = expat.errors.messages.get(exc.code, str(exc))
        raise XmlProblem(
            source, f"not well-formed XML at line {exc.lineno}, column {exc.offset}: {reason}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise XmlProblem(source, f"cannot be parsed as XML: {exc}") from None
    return builder.close()


def read_xml(path: str | os.PathLike[str]) -> Element:
    """Read and parse the XML file *path*; every failure is an XmlProblem naming it."""
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        raise XmlProblem(name, f"cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise XmlProblem(name, "is not a regular file")
        if info.st_size > MAX_XML_SIZE:
            raise XmlProblem(
                name, f"is {info.st_size} bytes, more than the {MAX_XML_SIZE} qbitmap reads"
            )
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_XML_SIZE:
                raise XmlProblem(name, f"grew past the {MAX_XML_SIZE} bytes qbitmap reads")
            chunks.append(chunk)
    except OSError as exc:
        raise XmlProblem(name, f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return parse_xml_bytes(b"".join(chunks), source=name)


def text_of(element: Element | None) -> str | None:
    """The stripped text of *element*, or None when it is absent or empty."""
    if element is None or element.text is None:
        return None
    text = element.text.strip()
    return text or None


__all__ = ["MAX_XML_SIZE", "XmlProblem", "parse_xml_bytes", "read_xml", "text_of"]
