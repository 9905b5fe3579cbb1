"""libvirt's domain definitions and checkpoint metadata, as far as qbitmap needs them.

Read from the files libvirt writes, never written back:

* a domain definition (``/etc/libvirt/qemu/DOMAIN.xml``, or ``virsh dumpxml``
  output): its name, and per ``<devices><disk>`` the target (``vda``), the
  device (disk, cdrom, ...), the source type (file, block, network, volume,
  ...), the driver format (``<driver type='qcow2'/>``), the source
  (``<source file=...>`` or ``<source dev=...>``; the **top** image) and
  ``<readonly/>``;
* a checkpoint (``/var/lib/libvirt/qemu/checkpoint/DOMAIN/NAME.xml``, or
  ``virsh checkpoint-dumpxml`` output): ``<name>``, ``<parent><name>``,
  ``<creationTime>``, per ``<disks><disk>`` the target name, ``checkpoint``
  (``bitmap`` or ``no``) and ``bitmap`` (the checkpoint's name when
  omitted), ``<active>1</active>`` on the current checkpoint, and the domain
  definition as it was when the checkpoint was made.

Malformed content raises :class:`XmlProblem` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element

from qbitmap.libvirt.xmlsafe import XmlProblem, read_xml, text_of


@dataclass(frozen=True)
class DiskDefinition:
    """One ``<disk>`` of a domain definition."""

    target: str  # <target dev=...>: the name checkpoints and backups use
    device: str  # disk, cdrom, floppy, lun
    type: str  # file, block, network, volume, dir, nvme, vhostuser
    format: str | None  # <driver type=...>
    source: str | None  # the file or device path of the top image (None: no local path)
    readonly: bool

    @property
    def local_path(self) -> Path | None:
        if self.type in ("file", "block") and self.source:
            return Path(self.source)
        return None

    def not_checkable_reason(self) -> str | None:
        """Why qbitmap cannot look at this disk's bitmaps, or None when it can."""
        if self.type not in ("file", "block"):
            return f"a {self.type} disk: its images are not local files qbitmap can read"
        if not self.source:
            return "the disk has no source (an empty drive)"
        if self.format != "qcow2":
            what = self.format or "unspecified"
            return f"its format is {what}, not qcow2: it cannot hold persistent bitmaps"
        return None


@dataclass(frozen=True)
class DomainDefinition:
    """The parts of a domain definition qbitmap uses."""

    name: str
    uuid: str | None
    disks: tuple[DiskDefinition, ...]
    path: str | None  # the file it was read from
    # <domain id=N>: only in live XML (virsh dumpxml of a running domain).
    running_id: int | None = None

    def disk(self, target: str) -> DiskDefinition | None:
        for disk in self.disks:
            if disk.target == target:
                return disk
        return None


@dataclass(frozen=True)
class CheckpointDisk:
    """One ``<disk>`` of a checkpoint."""

    name: str  # the disk target
    checkpoint: str  # "bitmap" or "no"
    bitmap: str | None  # the bitmap name libvirt recorded


@dataclass(frozen=True)
class CheckpointDefinition:
    """One checkpoint's metadata."""

    name: str
    parent: str | None
    creation_time: int | None
    disks: tuple[CheckpointDisk, ...]
    current: bool  # <active>1</active>: the checkpoint new ones get as parent
    path: str | None
    domain: DomainDefinition | None  # the domain as it was when the checkpoint was made


def _required_text(root: Element, tag: str, source: str) -> str:
    value = text_of(root.find(tag))
    if value is None:
        raise XmlProblem(source, f"<{root.tag}> has no <{tag}>")
    return value


def domain_from_element(root: Element, *, source: str) -> DomainDefinition:
    """A domain definition from its ``<domain>`` element."""
    if root.tag != "domain":
        raise XmlProblem(source, f"the document is <{root.tag}>, not a libvirt <domain>")
    name = _required_text(root, "name", source)
    disks = []
    devices = root.find("devices")
    for disk in [] if devices is None else devices.findall("disk"):
        target = disk.find("target")
        dev = None if target is None else target.get("dev")
        if not dev:
            raise XmlProblem(source, "a <disk> has no <target dev=...>")
        source_el = disk.find("source")
        kind = disk.get("type", "file")
        path = None
        if source_el is not None:
            path = source_el.get("file") if kind == "file" else source_el.get("dev")
        driver = disk.find("driver")
        disks.append(
            DiskDefinition(
                target=dev,
                device=disk.get("device", "disk"),
                type=kind,
                format=None if driver is None else driver.get("type"),
                source=path,
                readonly=disk.find("readonly") is not None,
            )
        )
    running_id = None
    raw_id = root.get("id")
    if raw_id is not None and raw_id.lstrip("-").isdigit():
        running_id = int(raw_id)
    return DomainDefinition(
        name=name,
        uuid=text_of(root.find("uuid")),
        disks=tuple(disks),
        path=source,
        running_id=running_id,
    )


def read_domain(path: str | os.PathLike[str]) -> DomainDefinition:
    """Read a domain definition file (persistent definition or ``virsh dumpxml`` output)."""
    source = os.fspath(path)
    return domain_from_element(read_xml(source), source=source)


def checkpoint_from_element(root: Element, *, source: str) -> CheckpointDefinition:
    """A checkpoint from its ``<domaincheckpoint>`` element."""
    if root.tag != "domaincheckpoint":
        raise XmlProblem(source, f"the document is <{root.tag}>, not a libvirt <domaincheckpoint>")
    name = _required_text(root, "name", source)
    parent_el = root.find("parent")
    parent = None if parent_el is None else text_of(parent_el.find("name"))
    created = text_of(root.find("creationTime"))
    creation_time = int(created) if created is not None and created.isdigit() else None
    disks = []
    disks_el = root.find("disks")
    for disk in [] if disks_el is None else disks_el.findall("disk"):
        target = disk.get("name")
        if not target:
            raise XmlProblem(source, "a checkpoint <disk> has no name")
        kind = disk.get("checkpoint", "bitmap")
        bitmap = disk.get("bitmap")
        if kind == "bitmap" and not bitmap:
            bitmap = name
        disks.append(CheckpointDisk(target, kind, bitmap if kind == "bitmap" else None))
    domain = None
    domain_el = root.find("domain")
    if domain_el is not None:
        domain = domain_from_element(domain_el, source=source)
    return CheckpointDefinition(
        name=name,
        parent=parent,
        creation_time=creation_time,
        disks=tuple(disks),
        current=text_of(root.find("active")) == "1",
        path=source,
        domain=domain,
    )


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointDefinition:
    """Read one checkpoint metadata file."""
    source = os.fspath(path)
    return checkpoint_from_element(read_xml(source), source=source)


__all__ = [
    "CheckpointDefinition",
    "CheckpointDisk",
    "DiskDefinition",
    "DomainDefinition",
    "checkpoint_from_element",
    "domain_from_element",
    "read_checkpoint",
    "read_domain",
]
