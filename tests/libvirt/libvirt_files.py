"""A libvirt host's files, laid out as libvirt 9.0 writes them, for offline tests.

:class:`Host` writes a config directory (``DOMAIN.xml``) and a checkpoint
directory (``DOMAIN/NAME.xml``) into a temporary directory.  The files are
made from libvirt's own output (``tests/fixtures/libvirt/``): the captured
persistent definition with its ``<disk>`` elements replaced, the captured
checkpoint file with its name, parent, time and ``<disks>`` replaced.  The
disk images themselves are made by QEMU's tools (``tests/qemu.py``).

A plain module: test modules import it by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

TESTS = Path(__file__).resolve().parents[1]

FIXTURES = TESTS / "fixtures" / "libvirt"
DOMAIN_TEMPLATE = (FIXTURES / "vm1.xml").read_text()
CHECKPOINT_TEMPLATE = (FIXTURES / "cp2.xml").read_text()
_DISK = re.compile(r"    <disk .*?</disk>\n", re.DOTALL)


@dataclass(frozen=True)
class Disk:
    """A ``<disk>`` of the domain definition."""

    target: str
    source: str | None
    format: str = "qcow2"
    type: str = "file"  # file, block, network, volume
    device: str = "disk"

    def xml(self) -> str:
        if self.type == "network":
            source = "      <source protocol='rbd' name='pool/image'/>\n"
        elif self.type == "volume":
            source = "      <source pool='default' volume='vm.qcow2'/>\n"
        elif self.source is None:
            source = ""
        else:
            attr = "file" if self.type == "file" else "dev"
            source = f"      <source {attr}={quoteattr(self.source)}/>\n"
        return (
            f"    <disk type='{self.type}' device='{self.device}'>\n"
            f"      <driver name='qemu' type='{self.format}'/>\n"
            f"{source}"
            f"      <target dev={quoteattr(self.target)} bus='virtio'/>\n"
            "    </disk>\n"
        )


def domain_xml(name: str, disks: list[Disk]) -> str:
    """libvirt's persistent definition of domain *name* with *disks*."""
    text = DOMAIN_TEMPLATE.replace("vm1", name)
    first = _DISK.search(text)
    assert first is not None
    text = _DISK.sub("", text)
    return text[: first.start()] + "".join(d.xml() for d in disks) + text[first.start() :]


def checkpoint_xml(
    domain: str,
    name: str,
    *,
    parent: str | None,
    disks: list[tuple[str, ...]],
    creation_time: int,
    domain_disks: list[Disk] | None = None,
) -> str:
    """libvirt's file for checkpoint *name*: *disks* are ``(target, 'bitmap'|'no'[, bitmap])``.

    The embedded domain definition has *domain_disks* (default: vda only).
    """
    head = CHECKPOINT_TEMPLATE.partition("  <domain ")[0]
    head = head.replace("<name>cp2</name>", f"<name>{_escape(name)}</name>", 1)
    if parent is None:
        head = re.sub(r"  <parent>\n.*?</parent>\n", "", head, flags=re.DOTALL)
    else:
        head = head.replace("<name>cp1</name>", f"<name>{_escape(parent)}</name>", 1)
    head = re.sub(
        r"<creationTime>\d+</creationTime>", f"<creationTime>{creation_time}</creationTime>", head
    )
    lines = []
    for disk in disks:
        target, kind = disk[0], disk[1]
        if kind == "bitmap":
            bitmap = disk[2] if len(disk) > 2 else name
            lines.append(
                f"    <disk name={quoteattr(target)} checkpoint='bitmap' "
                f"bitmap={quoteattr(bitmap)}/>\n"
            )
        else:
            lines.append(f"    <disk name={quoteattr(target)} checkpoint='no'/>\n")
    head = re.sub(r"    <disk .*?/>\n(    <disk .*?/>\n)*", "".join(lines), head, flags=re.DOTALL)
    if domain_disks is None:
        domain_disks = [Disk("vda", "/var/lib/libvirt/images/vm1.qcow2")]
    inner = domain_xml(domain, domain_disks)
    inner = inner[inner.index("<domain ") :].rstrip("\n")
    embedded = "\n".join("  " + line for line in inner.splitlines())
    return head + embedded + "\n</domaincheckpoint>\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Host:
    """The config and checkpoint directories of a synthetic libvirt host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_dir = root / "etc-libvirt-qemu"
        self.checkpoint_dir = root / "checkpoint"
        self.images = root / "images"
        for d in (self.config_dir, self.checkpoint_dir, self.images):
            d.mkdir(parents=True, exist_ok=True)
        self._clock = 1_700_000_000

    def define(self, name: str, disks: list[Disk]) -> Path:
        path = self.config_dir / f"{name}.xml"
        path.write_text(domain_xml(name, disks))
        path.chmod(0o600)
        return path

    def checkpoint(
        self,
        domain: str,
        name: str,
        *,
        parent: str | None = None,
        disks: tuple[tuple[str, ...], ...] = (("vda", "bitmap"),),
        domain_disks: list[Disk] | None = None,
    ) -> Path:
        self._clock += 60
        directory = self.checkpoint_dir / domain
        directory.mkdir(exist_ok=True)
        path = directory / f"{name}.xml"
        path.write_text(
            checkpoint_xml(
                domain,
                name,
                parent=parent,
                disks=list(disks),
                creation_time=self._clock,
                domain_disks=domain_disks,
            )
        )
        path.chmod(0o600)
        return path

    def args(self) -> list[str]:
        """The options pointing ``qbitmap checkpoints`` at this host."""
        return ["--config-dir", str(self.config_dir), "--checkpoint-dir", str(self.checkpoint_dir)]
