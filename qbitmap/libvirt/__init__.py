"""libvirt's checkpoints of a domain, judged offline from libvirt's files and the disk images.

Reads, never writes, libvirt's files: domain definitions (:mod:`definitions`)
parsed by a hardened XML reader (:mod:`xmlsafe`), and per checkpoint x disk
the verdict libvirt would reach (:mod:`verdicts`), built on the backing-chain
rule of :mod:`qbitmap.check.chain`; :mod:`disks` examines one disk's chain and
:mod:`parallel` many at once.  Sits at the level of ``check`` and
``recover``: no click, no rich.
"""

from __future__ import annotations

from qbitmap.libvirt.definitions import (
    CheckpointDefinition,
    CheckpointDisk,
    DiskDefinition,
    DomainDefinition,
    read_checkpoint,
    read_domain,
)
from qbitmap.libvirt.disks import DiskState, ImageCache, examine_disk
from qbitmap.libvirt.verdicts import (
    DEFAULT_CHECKPOINT_DIR,
    DEFAULT_CONFIG_DIR,
    VERDICT_ORDER,
    CheckpointState,
    DiskVerdict,
    DomainReport,
    Finding,
    Orphan,
    Remedy,
    domain_files,
    examine_domain,
    examine_domain_files,
    examine_domains,
)
from qbitmap.libvirt.xmlsafe import XmlProblem

__all__ = [
    "DEFAULT_CHECKPOINT_DIR",
    "DEFAULT_CONFIG_DIR",
    "VERDICT_ORDER",
    "CheckpointDefinition",
    "CheckpointDisk",
    "CheckpointState",
    "DiskDefinition",
    "DiskState",
    "DiskVerdict",
    "DomainDefinition",
    "DomainReport",
    "Finding",
    "ImageCache",
    "Orphan",
    "Remedy",
    "XmlProblem",
    "domain_files",
    "examine_disk",
    "examine_domain",
    "examine_domain_files",
    "examine_domains",
    "read_checkpoint",
    "read_domain",
]
