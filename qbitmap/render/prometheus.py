"""Metrics for Prometheus: ``check --prometheus`` and ``checkpoints --prometheus``.

The text exposition format node_exporter's textfile collector reads
(``# HELP``, ``# TYPE``, one sample a line, every family's samples
together, no timestamps: the collector refuses them).  Every metric is a
gauge.  A status is a state set: one sample per possible status, 1 for the
one that holds, 0 for the others, so an alert is ``== 1`` on a label and a
series never disappears when a status changes.

Label values come from images (bitmap names), the command line (file
names) and libvirt's files (domain, checkpoint and disk names): they are
data.  Each goes through :func:`qbitmap.render.printable` first, as on a
terminal (a control character, a bidi override or a byte that is not UTF-8
becomes a visible escape such as ``\\x1b``), then the format's own escapes
(``\\\\``, ``\\"``, ``\\n``): the file stays valid UTF-8, one sample a line.
Two names that come out the same (two bitmaps QEMU knows by one name, a
corruption check reports) are told apart by ``#2``, ``#3``: Prometheus
refuses a file that repeats a series.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from qbitmap.render import printable

if TYPE_CHECKING:
    from qbitmap.check import CheckReport
    from qbitmap.libvirt import DomainReport


def escape_label_value(value: str) -> str:
    """*value* as a label value: printable, then escaped as the exposition format requires."""
    return printable(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unique(values: Sequence[str]) -> list[str]:
    """*values* with each repeat suffixed ``#2``, ``#3``... (never equal to another value)."""
    taken = set(values)
    seen: set[str] = set()
    out = []
    for value in values:
        if value in seen:
            n = 2
            while f"{value}#{n}" in taken:
                n += 1
            value = f"{value}#{n}"
            taken.add(value)
        seen.add(value)
        out.append(value)
    return out


@dataclass
class Family:
    """One metric: its name, help text and samples (label values already escaped)."""

    name: str
    help: str
    samples: list[tuple[tuple[tuple[str, str], ...], int | float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((tuple(labels.items()), value))


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def write_families(out: IO[str], families: Iterable[Family]) -> None:
    """Write *families* in the text exposition format, each with its HELP and TYPE lines."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}\n")
        lines.append(f"# TYPE {family.name} gauge\n")
        for labels, value in family.samples:
            body = ",".join(f'{key}="{text}"' for key, text in labels)
            lines.append(f"{family.name}{{{body}}} {_number(value)}\n")
    out.write("".join(lines))


# -- check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapMetrics:
    """What the metrics say about one bitmap."""

    name: str
    status: str  # check's: consistent, in-use, corrupt, ignored
    recording: bool | None  # the auto flag; None without a directory entry
    granularity: int | None
    dirty_bytes: int | None  # on disk; None when its data could not be read


@dataclass(frozen=True)
class CheckedImage:
    """What the metrics say about one image ``check`` was given."""

    filename: str
    exit_code: int
    checked_at: float  # Unix time the check of this image ended
    findings: Mapping[str, int]  # severity word -> count
    bitmaps: tuple[BitmapMetrics, ...] = ()


def checked_image(report: CheckReport, dirty: Mapping[int, int], checked_at: float) -> CheckedImage:
    """The metrics of *report*; *dirty* holds dirty bytes by directory index."""
    counts: dict[str, int] = {}
    for finding in report.findings:
        counts[finding.severity.label] = counts.get(finding.severity.label, 0) + 1
    bitmaps = []
    for b in report.bitmaps:
        entry = b.entry
        granularity = None
        if entry is not None and 0 <= entry.granularity_bits <= 63:
            granularity = entry.granularity
        bitmaps.append(
            BitmapMetrics(
                name=b.name,
                status=b.status,
                recording=None if entry is None else entry.auto,
                granularity=granularity,
                dirty_bytes=None if entry is None else dirty.get(entry.index),
            )
        )
    return CheckedImage(report.filename, report.exit_code, checked_at, counts, tuple(bitmaps))


def failed_image(filename: str, exit_code: int, checked_at: float) -> CheckedImage:
    """An image whose check made no report (a ``-b`` name it lacks, an internal error)."""
    return CheckedImage(filename, exit_code, checked_at, {"failed": 1})


def check_families(images: Sequence[CheckedImage]) -> list[Family]:
    """The metric families of ``check --prometheus`` over *images*."""
    from qbitmap.check import STATUSES, Severity

    exit_code = Family(
        "qbitmap_check_exit_code",
        "Exit status of qbitmap check for the image: 0 consistent, 1 could not check, "
        "2 corrupt, 3 leaked clusters only, 4 stale bitmaps recover can bring back, "
        "75 held by a running writer.",
    )
    timestamp = Family(
        "qbitmap_check_timestamp_seconds",
        "When qbitmap check last checked the image (Unix time).",
    )
    findings = Family(
        "qbitmap_check_findings",
        "Findings of qbitmap check in the image, by severity.",
    )
    bitmaps = Family(
        "qbitmap_check_bitmaps",
        "Bitmaps qbitmap check reports in the image.",
    )
    status = Family(
        "qbitmap_bitmap_status",
        "Status of the bitmap (check's): 1 for the one that holds, 0 for the others.",
    )
    dirty = Family(
        "qbitmap_bitmap_dirty_bytes",
        "Guest bytes the bitmap marks dirty on disk (stale while the bitmap is in use).",
    )
    recording = Family(
        "qbitmap_bitmap_recording",
        "1 if the bitmap records guest writes (flag auto), 0 if it is disabled.",
    )
    granularity = Family(
        "qbitmap_bitmap_granularity_bytes",
        "Guest bytes one bit of the bitmap covers.",
    )
    severities = [s.label for s in Severity]
    labels = _unique([escape_label_value(image.filename) for image in images])
    for image, label in zip(images, labels, strict=True):
        exit_code.add(image.exit_code, image=label)
        timestamp.add(image.checked_at, image=label)
        for word in severities:
            findings.add(image.findings.get(word, 0), image=label, severity=word)
        bitmaps.add(len(image.bitmaps), image=label)
        names = _unique([escape_label_value(b.name) for b in image.bitmaps])
        for bm, name in zip(image.bitmaps, names, strict=True):
            for word in STATUSES:
                status.add(int(bm.status == word), image=label, bitmap=name, status=word)
            if bm.dirty_bytes is not None:
                dirty.add(bm.dirty_bytes, image=label, bitmap=name)
            if bm.recording is not None:
                recording.add(int(bm.recording), image=label, bitmap=name)
            if bm.granularity is not None:
                granularity.add(bm.granularity, image=label, bitmap=name)
    return [exit_code, timestamp, findings, bitmaps, status, dirty, recording, granularity]


def write_check_metrics(out: IO[str], images: Sequence[CheckedImage]) -> None:
    write_families(out, check_families(images))


# -- checkpoints ----------------------------------------------------------------------------


def checkpoints_families(reports: Sequence[DomainReport], checked_at: float) -> list[Family]:
    """The metric families of ``checkpoints --prometheus`` over *reports* (one per domain)."""
    from qbitmap.libvirt.verdicts import VERDICT_ORDER

    exit_code = Family(
        "qbitmap_checkpoints_exit_code",
        "Exit status of qbitmap checkpoints for the domain: 0 every checkpoint usable, "
        "1 could not read, 2 unusable and not repairable here, 4 every problem repairable, "
        "75 running.",
    )
    timestamp = Family(
        "qbitmap_checkpoints_timestamp_seconds",
        "When qbitmap checkpoints last examined the domain (Unix time).",
    )
    running = Family(
        "qbitmap_checkpoints_running",
        "1 if the domain was running (its checkpoints are then not judged), else 0.",
    )
    count = Family(
        "qbitmap_checkpoints_checkpoints",
        "Checkpoints libvirt's metadata holds for the domain.",
    )
    orphans = Family(
        "qbitmap_checkpoints_orphan_bitmaps",
        "Bitmaps in the domain's disks whose name is no checkpoint's name.",
    )
    verdict = Family(
        "qbitmap_checkpoint_verdict",
        "Whether libvirt will use the checkpoint for the disk: 1 for the verdict that holds, "
        "0 for the others.",
    )
    domains = _unique([escape_label_value(r.domain) for r in reports])
    for report, domain in zip(reports, domains, strict=True):
        exit_code.add(report.exit_code, domain=domain)
        timestamp.add(checked_at, domain=domain)
        running.add(int(report.running), domain=domain)
        count.add(len(report.checkpoints), domain=domain)
        orphans.add(len(report.orphans), domain=domain)
        pairs = [(cp.name, v) for cp in report.checkpoints for v in cp.disks]
        keys = _unique(
            [f"{escape_label_value(name)}\0{escape_label_value(v.disk)}" for name, v in pairs]
        )
        for (_, v), key in zip(pairs, keys, strict=True):
            checkpoint, _, disk = key.partition("\0")
            for word in VERDICT_ORDER:
                verdict.add(
                    int(v.verdict == word),
                    domain=domain,
                    checkpoint=checkpoint,
                    disk=disk,
                    verdict=word,
                )
    return [exit_code, timestamp, running, count, orphans, verdict]


def write_checkpoints_metrics(
    out: IO[str], reports: Sequence[DomainReport], checked_at: float
) -> None:
    write_families(out, checkpoints_families(reports, checked_at))
