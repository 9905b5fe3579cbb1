"""The bitmaps of a backing chain, judged by libvirt's rule for a checkpoint bitmap.

Every qcow2 layer of the chain gets the full ``check`` (:func:`check_image`);
then each bitmap name found anywhere in the chain is judged the way libvirt
judges the bitmap of a checkpoint before an incremental backup or a
``checkpoint-create --redefine --redefine-validate``
(``qemuBlockBitmapChainIsValid`` in libvirt's src/qemu/qemu_block.c),
walking from the top image down:

1. the top image has a bitmap of that name;
2. the layers that have it are consecutive: once a layer lacks it, no lower
   layer may have it;
3. in every layer that has it, the bitmap is persistent, recording and not
   inconsistent.

Offline, every bitmap stored in a qcow2 file is persistent; "recording" is
the ``auto`` flag (QEMU loads a bitmap without it disabled); "inconsistent"
is the ``in_use`` flag.  Two things make libvirt see no bitmap at all where
the file has one: QEMU ignores every bitmap of an image whose bitmaps
extension it does not trust (version 2, or autoclear bit 0 clear), and it
cannot open an image ``check`` calls corrupt.

A verdict lists every problem per layer, so that a repair can act on each:
``missing`` (not in the top image), ``gap`` (absent from a layer between
layers that have it), ``in-use``, ``not-recording``, ``corrupt``,
``unreadable``.  The first in that order of :data:`PROBLEMS` names the
verdict; ``ok`` when there is none.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbitmap.check import BitmapStatus, CheckReport, Severity, check_image, check_path
from qbitmap.errors import ExitCode, QbitmapError, UsageError
from qbitmap.format import AutoclearFeature, layout
from qbitmap.format.chain import BackingChain, ChainError, ChainLayer, open_chain

#: Problem kinds, most severe first: the first present names the verdict.
PROBLEMS = ("unreadable", "corrupt", "missing", "gap", "in-use", "not-recording")
#: Every verdict word.
VERDICTS = ("ok", *PROBLEMS)
#: Problems a repair can fix in place (the others need a person or a full backup).
REPAIRABLE = frozenset({"missing", "gap", "in-use", "not-recording"})
#: ``check``'s precedence of exit statuses when several apply (man/qbitmap-check.1).
EXIT_PRECEDENCE = (
    ExitCode.FAILED,
    ExitCode.BUSY,
    ExitCode.CORRUPT,
    ExitCode.IN_USE,
    ExitCode.LEAKS,
    ExitCode.OK,
)


def qemu_default_granularity(cluster_size: int) -> int:
    """The granularity QEMU gives a bitmap created without one: the cluster size, 4-64 KiB.

    What ``block-dirty-bitmap-add`` without ``granularity`` (libvirt's
    checkpoints) and ``qemu-img bitmap --add`` without ``-g`` choose
    (docs/libvirt-facts.md).
    """
    return min(max(cluster_size, 4096), 65536)


def worst_exit_code(codes: Iterable[int]) -> int:
    """The exit status that wins among *codes* by check's precedence (0 for none)."""
    present = set(codes)
    for code in EXIT_PRECEDENCE:
        if code in present:
            return int(code)
    # A status outside the documented set: keep it rather than hide it.
    return max(present) if present else int(ExitCode.OK)


@dataclass
class LayerView:
    """One layer of the chain with what ``check`` found in it."""

    layer: ChainLayer
    report: CheckReport | None  # None for a raw layer
    #: QEMU loads none of this layer's bitmaps: version 2, or autoclear bit 0 clear.
    bitmaps_ignored: bool = False

    @property
    def index(self) -> int:
        return self.layer.index

    @property
    def filename(self) -> str:
        return self.layer.filename

    def bitmap(self, name: str) -> BitmapStatus | None:
        if self.report is None:
            return None
        for status in self.report.bitmaps:
            if status.name == name:
                return status
        return None

    def names(self) -> list[str]:
        return [] if self.report is None else [b.name for b in self.report.bitmaps]


@dataclass(frozen=True)
class LayerBitmap:
    """What one layer holds under a bitmap name."""

    index: int
    filename: str
    present: bool  # the file has a bitmap of that name (even one QEMU ignores)
    status: str | None  # check's status when present: consistent, in-use or corrupt
    recording: bool | None  # the auto flag, when present
    granularity: int | None  # bytes, when present

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "filename": self.filename,
            "present": self.present,
            "status": self.status,
            "recording": self.recording,
            "granularity": self.granularity,
        }


@dataclass(frozen=True)
class LayerProblem:
    """One reason libvirt refuses the bitmap, located in one layer."""

    kind: str  # one of PROBLEMS
    index: int  # the layer
    filename: str
    detail: str  # one sentence
    repairable: bool  # whether a repair in this layer alone can fix it
    #: For missing and gap: the granularity a bitmap created here should have: that of
    #: the bitmap in the nearest layer that has it, else QEMU's default for this layer.
    granularity: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "index": self.index,
            "filename": self.filename,
            "detail": self.detail,
            "repairable": self.repairable,
            "granularity": self.granularity,
        }


@dataclass(frozen=True)
class ChainBitmapVerdict:
    """libvirt's rule applied to one bitmap name over one chain."""

    name: str
    verdict: str  # one of VERDICTS
    reason: str  # one sentence
    layers: tuple[LayerBitmap, ...]  # one per layer examined, top first
    problems: tuple[LayerProblem, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def repairable(self) -> bool:
        """Every problem can be repaired in place (False when there is none)."""
        return bool(self.problems) and all(p.repairable for p in self.problems)

    @property
    def present_in(self) -> tuple[int, ...]:
        return tuple(lb.index for lb in self.layers if lb.present)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "reason": self.reason,
            "repairable": self.repairable,
            "present_in": list(self.present_in),
            "layers": [lb.to_dict() for lb in self.layers],
            "problems": [p.to_dict() for p in self.problems],
        }


def _layer_state(view: LayerView, name: str) -> LayerBitmap:
    status = view.bitmap(name)
    if status is None:
        return LayerBitmap(view.index, view.filename, False, None, None, None)
    entry = status.entry
    granularity = None
    recording = None
    if entry is not None:
        recording = entry.auto
        if 0 <= entry.granularity_bits <= 63:
            granularity = entry.granularity
    return LayerBitmap(view.index, view.filename, True, status.status, recording, granularity)


def _granularity_for(view: LayerView, layers: Sequence[LayerBitmap], index: int) -> int | None:
    """The granularity a bitmap created in layer *index* should get (None: not a qcow2 layer)."""
    present = [lb for lb in layers if lb.present and lb.granularity is not None]
    if present:
        return min(present, key=lambda lb: abs(lb.index - index)).granularity
    if view.layer.cluster_size is None:
        return None
    return qemu_default_granularity(view.layer.cluster_size)


def _codes(report: CheckReport, exit_code: int) -> str:
    wanted = Severity.FAILED if exit_code == ExitCode.FAILED else Severity.CORRUPT
    codes = sorted({f.code for f in report.findings if f.severity >= wanted})
    return ", ".join(codes) or "see 'qbitmap check'"


def judge_bitmap(
    name: str, views: Sequence[LayerView], *, chain_error: ChainError | None = None
) -> ChainBitmapVerdict:
    """Apply libvirt's rule for bitmap *name* to the chain *views* (top first).

    *chain_error* says the walk stopped before the bottom: the layers below
    are unknown, so the verdict is ``unreadable`` unless a worse problem is
    already certain.
    """
    layers = tuple(_layer_state(v, name) for v in views)
    problems: list[LayerProblem] = []
    # A layer QEMU cannot open, or whose bitmaps it ignores, shows libvirt no bitmap.
    visible = []
    for view, state in zip(views, layers, strict=True):
        report = view.report
        code = report.exit_code if report is not None else ExitCode.OK
        if code == ExitCode.FAILED:
            problems.append(
                LayerProblem(
                    "unreadable",
                    view.index,
                    view.filename,
                    f"layer {view.index} ({view.filename}) could not be checked "
                    f"({_codes(report, code)})",  # type: ignore[arg-type]
                    False,
                )
            )
        elif code == ExitCode.CORRUPT:
            problems.append(
                LayerProblem(
                    "corrupt",
                    view.index,
                    view.filename,
                    f"layer {view.index} ({view.filename}) is corrupt ({_codes(report, code)})",  # type: ignore[arg-type]
                    False,
                )
            )
        visible.append(state.present and not view.bitmaps_ignored)
    if chain_error is not None:
        problems.append(
            LayerProblem(
                "unreadable",
                len(views),
                "",
                f"the chain below layer {len(views) - 1} could not be followed: {chain_error}",
                False,
            )
        )
    lowest = max((i for i, seen in enumerate(visible) if seen), default=-1)
    for view, state, seen in zip(views, layers, visible, strict=True):
        i = view.index
        if not seen and (i == 0 or i < lowest):
            kind = "missing" if i == 0 else "gap"
            if view.bitmaps_ignored:
                detail = (
                    f"QEMU ignores every bitmap of layer {i} ({view.filename}): a version 2 "
                    "image, or autoclear bit 0 clear"
                )
                repairable = False
            elif i == 0:
                detail = f"the top image ({view.filename}) has no bitmap {name!r}"
                repairable = True
            else:
                detail = (
                    f"layer {i} ({view.filename}) has no bitmap {name!r} but a layer below "
                    "it has one"
                )
                repairable = True
            if view.report is None:
                repairable = False
                detail = f"layer {i} ({view.filename}) is {view.layer.format}: it holds no bitmaps"
            elif (view.layer.qcow2_version or 3) < 3:
                repairable = False
                detail += " (a version 2 image, which holds no bitmaps)"
            problems.append(
                LayerProblem(
                    kind, i, view.filename, detail, repairable, _granularity_for(view, layers, i)
                )
            )
            continue
        if not seen:
            continue
        if state.status == "corrupt":
            problems.append(
                LayerProblem(
                    "corrupt",
                    i,
                    view.filename,
                    f"bitmap {name!r} in layer {i} ({view.filename}) has corrupt metadata",
                    False,
                )
            )
            continue
        if state.status == "in-use":
            problems.append(
                LayerProblem(
                    "in-use",
                    i,
                    view.filename,
                    f"bitmap {name!r} in layer {i} ({view.filename}) is in use: its writer "
                    "stopped without storing it",
                    True,
                )
            )
        if state.recording is False:
            problems.append(
                LayerProblem(
                    "not-recording",
                    i,
                    view.filename,
                    f"bitmap {name!r} in layer {i} ({view.filename}) is disabled (no auto flag)",
                    True,
                )
            )
    problems.sort(key=lambda p: (PROBLEMS.index(p.kind), p.index))
    if not problems:
        where = ", ".join(str(i) for i in (lb.index for lb in layers) if visible[i])
        reason = f"present, recording and consistent in layer{'s' if ',' in where else ''} {where}"
        return ChainBitmapVerdict(name, "ok", reason, layers, ())
    first = problems[0]
    reason = first.detail
    if len(problems) > 1:
        reason += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return ChainBitmapVerdict(name, first.kind, reason, layers, tuple(problems))


def bitmaps_ignored(view_layer: ChainLayer, chain: BackingChain) -> bool:
    """Whether QEMU ignores the bitmaps of qcow2 layer *view_layer* (v2, autoclear bit 0 clear)."""
    image = chain.images.get(view_layer.index)
    if image is None or image.extension(layout.EXT_BITMAPS) is None:
        return False
    header = image.header
    return header.version < 3 or not (header.autoclear & AutoclearFeature.BITMAPS)


def layer_views(chain: BackingChain) -> list[LayerView]:
    """Check every qcow2 layer of *chain* (read-only, no lock taken)."""
    views = []
    for layer in chain.layers:
        image = chain.images.get(layer.index)
        report = None
        if image is not None:
            report = check_image(image)
        views.append(LayerView(layer, report, bitmaps_ignored(layer, chain)))
    return views


def chain_names(views: Sequence[LayerView]) -> list[str]:
    """Every bitmap name in the chain: the top image's first, in directory order."""
    names: dict[str, None] = {}
    for view in views:
        for name in view.names():
            names.setdefault(name, None)
    return list(names)


@dataclass
class ChainCheckReport:
    """``check --backing-chain``: every layer's check and the chain verdict per bitmap name."""

    filename: str
    views: list[LayerView]
    error: ChainError | None
    verdicts: list[ChainBitmapVerdict] = field(default_factory=list)
    names: tuple[str, ...] = ()  # the -b selection (empty: every bitmap)

    def layer_report(self, view: LayerView) -> dict[str, Any] | None:
        """The layer's check report as ``check --json`` prints it, cut to the selection."""
        if view.report is None:
            return None
        out = view.report.to_dict()
        if self.names:
            wanted = set(self.names)
            out["bitmaps"] = [b for b in out["bitmaps"] if b["name"] in wanted]
            out["findings"] = [
                f.to_dict()
                for f in view.report.findings
                if f.area != "bitmap" or f.bitmap in wanted
            ]
        return out

    @property
    def exit_code(self) -> int:
        codes = [v.report.exit_code for v in self.views if v.report is not None]
        if self.error is not None:
            codes.append(int(ExitCode.FAILED))
        return worst_exit_code(codes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "backing_chain": [
                {
                    "index": v.index,
                    "filename": v.filename,
                    "format": v.layer.format,
                    "format_source": v.layer.format_source,
                    "backing_file": v.layer.backing_name,
                    "backing_file_format": v.layer.backing_format,
                    "virtual_size": v.layer.virtual_size,
                    "bitmaps_ignored": v.bitmaps_ignored,
                    "check": self.layer_report(v),
                }
                for v in self.views
            ],
            "chain_error": None
            if self.error is None
            else {"kind": self.error.kind, "message": self.error.message},
            "chain_bitmaps": [v.to_dict() for v in self.verdicts],
            "exit_code": self.exit_code,
        }


def check_chain(chain: BackingChain, *, names: Sequence[str] = ()) -> ChainCheckReport:
    """Check every layer of *chain* and judge each bitmap name (or those in *names*).

    Raises UsageError for a name in *names* that no layer has.
    """
    views = layer_views(chain)
    found = chain_names(views)
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise UsageError(
                f"{chain.layers[0].filename}: no bitmap named {missing[0]!r} in any layer "
                "of the backing chain"
            )
        selected = list(dict.fromkeys(names))
    else:
        selected = found
    verdicts = [judge_bitmap(n, views, chain_error=chain.error) for n in selected]
    return ChainCheckReport(
        filename=chain.layers[0].filename,
        views=views,
        error=chain.error,
        verdicts=verdicts,
        names=tuple(names),
    )


def check_chain_path(path: str, *, names: Sequence[str] = ()) -> ChainCheckReport:
    """Open the chain of *path* read-only and check it; an unreadable top image is a report too."""
    try:
        chain = open_chain(path)
    except QbitmapError:
        report = check_path(path)
        view = LayerView(ChainLayer(0, Path(path), "qcow2", "top"), report)
        return ChainCheckReport(filename=str(path), views=[view], error=None, names=tuple(names))
    with chain:
        return check_chain(chain, names=names)


__all__ = [
    "EXIT_PRECEDENCE",
    "PROBLEMS",
    "REPAIRABLE",
    "VERDICTS",
    "ChainBitmapVerdict",
    "ChainCheckReport",
    "LayerBitmap",
    "LayerProblem",
    "LayerView",
    "bitmaps_ignored",
    "chain_names",
    "check_chain",
    "check_chain_path",
    "judge_bitmap",
    "layer_views",
    "qemu_default_granularity",
    "worst_exit_code",
]
