"""Differential fuzz test: seeded mutants of QEMU-made images, QEMU as the oracle.

``test_mutant`` runs a fixed set of mutants (every operator on every base,
twice, plus one small mutant per class of disagreement that ``scripts/fuzz``
found) and asserts, for each, every property of issue 8 (see
``differential.PROPERTIES``); a failure names the mutant, what its edits
changed, what QEMU and qbitmap said, and the command that reproduces it.
The other tests pin the harness itself: mutants are reproducible, the
bases are what their recipes promise, QEMU's verdicts are read correctly,
a qbitmap run is really bounded, and each property fails when it should.

``scripts/fuzz`` runs the same machinery on thousands of mutants.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import bases
import differential as D
import layout
import mutants
import pytest
import qemu

#: Every operator on every base, twice: seeds 0 .. 2 * 19 * 7 - 1.
SWEEP_IDS = mutants.ids(2 * len(mutants.OPERATOR_NAMES) * len(bases.BASES), 0)
#: One small mutant per class of disagreement with QEMU that scripts/fuzz found (the classes of
#: docs/fuzz-findings.md), so that each class is in the suite even where the sweep has none.
CLASS_IDS = [
    mutants.MutantId.parse(text)
    for text in (
        "std64k:1330",  # C1  version 0: QEMU refuses, check exited 1 (now 2: image-invalid)
        "c512:334",  # C2  L1 entry reserved bit 56
        "crash4k:202",  # C2  L2 entry COPIED cleared, refcount 1
        "std64k:2235",  # C2  compressed L2 entry with COPIED
        "xl2:145",  # C2  extended L2: a subcluster both allocated and zero
        "crash64k:4610",  # C3  L2 entry -> first cluster past EOF; recover writes guest data there
        "c512:2413",  # C4  nb_snapshots 1 -> 2: snapshot table entry 1 incomplete
        "std64k:293",  # C5  name starting with NUL: QEMU's read-write open fails
        "std64k:578",  # C5  names equal as C strings: 'Bitmap already exists'
        "crash64k:84",  # C5  NUL name on an in-use bitmap: recover makes QEMU refuse the image
        "crash64k:350",  # C5  C-string duplicate of an in-use bitmap: likewise
        "std64k:1463",  # C6  bits past the end: --drop-broken drops a bitmap QEMU accepts
        "std64k:54",  # C6  directory one byte short of EOF: --drop-broken drops all bitmaps
        "crash4k:27",  # C6  empty name: --drop-broken drops it
        "std64k:80",  # C6  duplicate bitmaps extension: --drop-broken drops all bitmaps
        "std64k:227",  # C7  huge leaked refcount: recover frees it one reference at a time
        "std64k:37165",  # C8  unknown autoclear bit cleared before recover refuses
        "crash512:229",  # C9  external data file bit without a data file
        "std64k:57",  # C10 crypt_method 1 (AES): QEMU needs a key (accepted: not corruption)
        "std64k:28805",  # C11 dirty bit: refcount errors QEMU reports are not checked
        "crash64k:10393",  # C12 disk size 0: recovered bitmaps QEMU cannot load
        "c512:31972",  # C13 64-bit refcount 2^64-1 past EOF: recover's leak reclaim crashed
        "std64k:60130",  # C14 refcount past EOF: check said 0, recover rewrote a refcount block
        "noauto64k:11292",  # issue 8 item 1: a dropped table on a refcount table cluster stays
    )
]
CI_IDS = SWEEP_IDS + CLASS_IDS
#: The disagreements with QEMU that the core still has, in the CI set: mutant -> (its class in
#: docs/fuzz-findings.md, the properties it fails).  Such a mutant must fail exactly these
#: properties: another failure fails the test, and so does a fix (a strict xfail that passes), so
#: that this list always says what is still open and shrinks with every fix.
KNOWN_DISAGREEMENTS: dict[str, tuple[str, frozenset[str]]] = {
    mid: (cls, frozenset(props.split())) for mid, cls, props in ()
}
#: One CI mutant in this many also goes through the command line (a fresh interpreter costs
#: 0.3-1 s per run, four runs per mutant: most of the set's time otherwise).
CI_CLI_EVERY = 16
#: CPU budget of the whole mutant set, this process and every child together (measured: about
#: 75 CPU-seconds for the whole file, under two minutes of wall time on two shared cores; see
#: docs/fuzz-findings.md).  CPU time, not wall time, so that a busy machine cannot fail it.
CI_CPU_BUDGET_SECONDS = 240


@dataclass
class CiRun:
    outcomes: dict[str, D.Outcome]
    wall_seconds: float
    cpu_seconds: float


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> CiRun:
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    workdir = tmp_path_factory.mktemp("fuzz")
    wall, cpu = time.monotonic(), _cpu_seconds()
    jobs = max(1, min(2, os.cpu_count() or 1))
    runs = D.run_many(CI_IDS, jobs=jobs, workdir=workdir, cli_every=CI_CLI_EVERY)
    outcomes = {o.obs.mutant: o for o in runs}
    return CiRun(outcomes, time.monotonic() - wall, _cpu_seconds() - cpu)


@pytest.fixture(scope="session")
def outcomes(ci_run: CiRun) -> dict[str, D.Outcome]:
    return ci_run.outcomes


def _cpu_seconds() -> float:
    """User and system time of this process and of every child it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class KnownDisagreement(Exception):
    """A mutant failed exactly the properties :data:`KNOWN_DISAGREEMENTS` lists for it."""


def _mutant_param(mid: mutants.MutantId) -> object:
    known = KNOWN_DISAGREEMENTS.get(str(mid))
    if known is None:
        return pytest.param(mid, id=str(mid))
    cls, props = known
    mark = pytest.mark.xfail(
        raises=KnownDisagreement,
        strict=True,
        reason=f"{cls} of docs/fuzz-findings.md, still open: {' '.join(sorted(props))}",
    )
    return pytest.param(mid, id=str(mid), marks=mark)


@pytest.mark.parametrize("mid", [_mutant_param(m) for m in CI_IDS])
def test_mutant(mid: mutants.MutantId, outcomes: dict[str, D.Outcome]) -> None:
    out = outcomes[str(mid)]
    known = KNOWN_DISAGREEMENTS.get(str(mid))
    if known is not None and out.failures and {f.property for f in out.failures} == known[1]:
        raise KnownDisagreement("\n" + out.describe())
    assert not out.failures, "\n" + out.describe()


def test_known_disagreements_are_in_the_set() -> None:
    ids = {str(m) for m in CI_IDS}
    for mid, (cls, props) in KNOWN_DISAGREEMENTS.items():
        assert mid in ids, mid
        assert props and props <= set(D.PROPERTIES), (mid, props)
        assert cls.startswith("C"), (mid, cls)


def test_mutant_set_within_budget(ci_run: CiRun) -> None:
    assert ci_run.cpu_seconds <= CI_CPU_BUDGET_SECONDS, (
        f"{len(CI_IDS)} mutants took {ci_run.cpu_seconds:.0f} CPU-seconds "
        f"({ci_run.wall_seconds:.0f} s of wall time)"
    )


def test_mutant_set_covers_every_operator_and_base(outcomes: dict[str, D.Outcome]) -> None:
    families: dict[str, set[str]] = {}
    for mid in SWEEP_IDS:
        out = outcomes[str(mid)]
        assert out.obs.operators, f"{mid}: no edit"
        families.setdefault(out.obs.operators[0], set()).add(mid.base)
    assert set(families) == set(mutants.OPERATOR_NAMES)
    for op, used in families.items():
        # an edit that happens to change nothing falls back to another operator; "snapshot" has
        # no target on the bases without a snapshot
        assert len(used) >= (3 if op == "snapshot" else len(bases.BASES) - 2), (op, used)
    verdicts = {outcomes[str(m)].obs.qemu.verdict for m in SWEEP_IDS}
    assert verdicts >= set(D.VERDICTS), verdicts
    assert sum(1 for m in SWEEP_IDS if outcomes[str(m)].obs.cli) >= 8
    assert len({str(m) for m in CI_IDS}) == len(CI_IDS)


# -- mutants --------------------------------------------------------------------------------


def test_mutants_are_reproducible() -> None:
    for mid in [
        mutants.MutantId("crash64k", 27),
        mutants.MutantId("c512", 44),
        mutants.MutantId("xl2", 400),
        mutants.MutantId("crash4k", 12345),
    ]:
        first, second = mutants.make(mid), mutants.make(mid)
        assert first.data == second.data and first.edits == second.edits
        assert first.data != bases.build(mid.base), mid
        assert str(mutants.MutantId.parse(str(mid))) == str(mid)
    assert (
        mutants.make(mutants.MutantId("std64k", 1)).data
        != mutants.make(mutants.MutantId("std64k", 1 + len(mutants.OPERATOR_NAMES))).data
    )


def test_write_mutant_for_a_human(tmp_path: Path) -> None:
    mid = mutants.MutantId("crash512", 9)
    dest = tmp_path / "m.qcow2"
    assert (
        D.main(
            [
                "--write-mutant",
                str(mid),
                str(dest),
                "--write-mutant-base",
                str(tmp_path / "base.qcow2"),
                "--cache",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert dest.read_bytes() == mutants.make(mid).data
    assert (tmp_path / "base.qcow2").read_bytes() == bases.build("crash512")


def test_bases_are_what_the_recipes_say() -> None:
    for name in bases.BASES:
        lay = layout.parse(bases.build(name))
        info = {b["name"]: b["flags"] for b in _info_bitmaps(bases.build(name))}
        if name == "noauto64k":
            assert info == {} and not lay.header["autoclear_features"] & 1
            continue
        assert set(info) == {"b0", "bfine", "bz"}, name
        assert ("in-use" in info["b0"]) == name.startswith("crash"), (name, info)
        assert "auto" not in info["bz"]
        tables = {e.name: [w for w in _table(lay, name, e)] for e in lay.entries}
        assert any(tables[b"b0"]) and any(tables[b"bfine"]) and not any(tables[b"bz"]), name
    sizes = {name: layout.parse(bases.build(name)).cluster_size for name in bases.BASES}
    assert {512, 4096, 65536} <= set(sizes.values())
    refcount_bits = {layout.parse(bases.build(n)).refcount_bits for n in bases.BASES}
    assert {2, 4, 8, 16, 64} <= refcount_bits
    assert layout.parse(bases.build("xl2")).extended_l2
    assert layout.parse(bases.build("std64k")).snapshots


def test_bases_are_reproducible() -> None:
    # a crash base is killed once its writes are on disk, however busy the machine is
    first = {name: bases.build(name) for name in bases.BASES}
    bases._CACHE.clear()
    for name in bases.BASES:
        assert bases.build(name) == first[name], name


def _info_bitmaps(data: bytes) -> list[dict]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".qcow2") as f:
        f.write(data)
        f.flush()
        return list(qemu.img_bitmaps(f.name).values())


def _table(lay: layout.Layout, name: str, entry: layout.DirEntry) -> list[int]:
    import struct

    data = bases.build(name)
    return [
        struct.unpack_from(">Q", data, entry.table_offset + 8 * i)[0]
        for i in range(entry.table_size)
    ]


def test_unmutated_bases_satisfy_every_property(tmp_path: Path) -> None:
    D._preload()
    for name in bases.BASES:
        obs = D.observe_image(name, bases.build(name), tmp_path, cli=name == "crash4k")
        assert obs.qemu.verdict == ("leaks" if name == "noauto64k" else "clean"), (name, obs.qemu)
        assert obs.check.kind == "ok", obs.check
        out = D.Outcome(obs, D.evaluate(obs))
        assert not out.failures, out.describe()
        if name.startswith("crash"):
            # recover --mode full brings every in-use bitmap back: QEMU lists them without in-use
            assert obs.check.exit_code == 4
            assert all(r.changed and r.after.verdict == "clean" for r in obs.recover), (
                out.describe()
            )


# -- the oracle -----------------------------------------------------------------------------


def test_qemu_view_reads_each_verdict(tmp_path: Path) -> None:
    data = bytearray(bases.build("std64k"))
    lay = layout.parse(bytes(data))
    img = tmp_path / "v.qcow2"

    def view(edit) -> D.QemuView:
        buf = bytearray(data)
        edit(buf)
        img.write_bytes(buf)
        return D.qemu_view(img, tmp_path)

    assert view(lambda b: None).verdict == "clean"
    leak = view(lambda b: layout.set_refcount(lay, b, lay.clusters_with("bitmap-data")[0], 2))
    assert leak.verdict == "leaks" and leak.check_rc == 3
    low = view(lambda b: layout.set_refcount(lay, b, lay.clusters_with("l1")[0], 0))
    assert low.verdict == "errors" and low.check_rc == 2
    # incompatible bit 1 "corrupt": read-only opens work, a read-write open is refused
    corrupt = view(lambda b: b.__setitem__(slice(79, 80), b"\x02"))
    assert corrupt.verdict == "refuses" and corrupt.info_ok and "corrupt" in corrupt.reason
    assert corrupt.bitmaps == ["b0", "bfine", "bz"]
    # a bitmap named "\0fine": QEMU lists it, qemu-img check is happy, the read-write open fails
    nul = view(
        lambda b: b.__setitem__(
            slice(lay.entries[1].offset + 24, lay.entries[1].offset + 25), b"\0"
        )
    )
    assert nul.verdict == "refuses" and nul.check_rc == 0 and nul.info_ok
    assert "Can't update bitmap directory" in nul.reason
    assert view(lambda b: b.__setitem__(slice(0, 4), b"QFI\0")).verdict == "refuses"


def test_bounded_call_tells_every_outcome_apart() -> None:
    D._preload()
    ok = D.bounded_call(_returns, 7)
    assert ok.kind == "ok" and ok.exit_code == 7
    err = D.bounded_call(_raises_refused)
    assert err.kind == "error" and err.exit_code == 2 and "RefusedError" in err.detail
    crash = D.bounded_call(_raises_index)
    assert crash.kind == "crash" and crash.detail.startswith("IndexError")
    memory = D.bounded_call(_allocates, 4 << 30)
    assert memory.kind == "memory", memory
    blocked = D.bounded_call(time.sleep, 30, timeout=0.5)
    assert blocked.kind == "timeout" and blocked.seconds < 10
    spinning = D.bounded_call(_spins, cpu=1)
    assert spinning.kind == "timeout" and "CPU" in spinning.detail and 0.9 < spinning.cpu < 5
    killed = D.bounded_call(_killed)
    assert killed.kind == "signal"


def _returns(code: int) -> dict:
    return {"exit_code": code}


def _raises_refused() -> dict:
    from qbitmap.errors import RefusedError

    raise RefusedError("no")


def _raises_index() -> dict:
    return {"exit_code": [][1]}  # noqa: PLE0643 - the IndexError is the point


def _spins() -> dict:
    while True:
        pass


def _killed() -> dict:
    os.kill(os.getpid(), 9)
    return {}


def _allocates(size: int) -> dict:
    return {"exit_code": len(bytearray(size))}


def test_bounded_cli_judges_stderr_and_status(tmp_path: Path) -> None:
    img = tmp_path / "b.qcow2"
    img.write_bytes(bases.build("crash4k"))
    run = D.bounded_cli(["check", str(img)])
    assert (run.kind, run.exit_code) == ("ok", 4)
    run = D.bounded_cli(["check", "--json", str(tmp_path / "missing.qcow2")])
    assert run.kind == "error" and run.exit_code in D.CHECK_EXIT_CODES


# -- the properties -------------------------------------------------------------------------


def _obs(verdict: str = "clean", code: int = 0, **kw) -> D.Observation:
    q = D.QemuView(
        verdict,
        "why",
        check_rc={"clean": 0, "leaks": 3}.get(verdict, 2),
        info_ok=verdict != "refuses",
        bitmaps=["b0", "b1"],
    )
    return D.Observation("std64k:0", ["edit"], ["op"], q, D.Run("api", "ok", exit_code=code), **kw)


def _props(obs: D.Observation) -> set[str]:
    return {f.property for f in D.evaluate(obs)}


def _recovered(
    after: D.QemuView, *, compare: int = 0, run: D.Run | None = None, baseline: int | None = 0
) -> D.RecoverObs:
    return D.RecoverObs(
        False,
        run or D.Run("api", "ok", exit_code=0),
        changed=True,
        after=after,
        compare_rc=compare,
        baseline_rc=baseline,
    )


def test_each_property_fails_when_it_should() -> None:
    assert _props(_obs("clean", 0)) == set()
    assert _props(_obs("errors", 2)) == set()
    assert _props(_obs("errors", 4)) == {"rejected-exits-2"}
    assert _props(_obs("refuses", 3)) == {"rejected-exits-2", "usable-opens-rw"}
    assert _props(_obs("refuses", 1)) == {"rejected-exits-2"}
    locked = _obs("refuses", 0)  # an encrypted image: the oracle has no key, nothing is wrong
    locked.qemu.info_ok = True
    locked.qemu.reason = (
        "qemu-io: can't open device IMAGE: Parameter 'encrypt.key-secret' is required for cipher"
    )
    assert _props(locked) == set()
    locked.qemu.info_ok = False
    assert _props(locked) == {"rejected-exits-2", "usable-opens-rw"}
    assert _props(_obs("clean", 2)) == set()  # stricter than QEMU: listed, not a failure
    in_use = _obs("clean", 0)
    in_use.qemu.in_use = ["b0"]
    assert _props(in_use) == {"in-use-not-ok"}
    for code in (2, 4):
        in_use.check.exit_code = code
        assert _props(in_use) == set()
    in_use.check.exit_code = 3
    assert _props(in_use) == {"in-use-not-ok"}
    assert _props(_obs("leaks", 0)) == {"leaks-not-ok"}
    assert _props(_obs("leaks", 3)) == set()
    assert _props(_obs("leaks", 4)) == set()
    crash = _obs()
    crash.check = D.Run("api", "crash", detail="IndexError: x", where="qbitmap/check/a.py:f")
    assert _props(crash) == {"no-crash"}
    slow = _obs("refuses")
    slow.check = D.Run("api", "timeout")
    assert _props(slow) == {"bounded"}
    cli = _obs("clean", 0, cli=[("check IMAGE", D.Run("cli", "ok", exit_code=3))])
    assert _props(cli) == {"cli-agrees"}
    cli = _obs("clean", 0, cli=[("dump --json IMAGE", D.Run("cli", "error", exit_code=2))])
    assert _props(cli) == {"no-crash"}

    good = D.QemuView("clean", "", check_rc=0, info_ok=True, bitmaps=["b0", "b1"])
    assert _props(_obs("leaks", 3, recover=[_recovered(good)])) == set()
    bad = D.QemuView(
        "errors",
        "ERROR cluster 5 refcount=0 reference=1",
        check_rc=2,
        info_ok=True,
        bitmaps=["b0", "b1"],
    )
    assert _props(_obs("clean", 4, recover=[_recovered(bad)])) == {"recovered-check-clean"}
    lost = D.QemuView(
        "errors",
        "Lost persistent bitmaps",
        check_rc=0,
        info_ok=True,
        bitmaps=["b0"],
        rw_errors=["qemu-io: Lost persistent bitmaps during inactivation"],
    )
    assert _props(_obs("clean", 4, recover=[_recovered(lost)])) == {
        "recovered-opens-rw",
        "recovered-keeps-bitmaps",
    }
    assert _props(_obs("clean", 4, recover=[_recovered(good, compare=1)])) == {
        "recovered-same-data"
    }
    # an in-use bitmap of a 0-byte disk holds no bit: --drop-broken may drop it, nothing else
    none = D.QemuView("clean", "", check_rc=0, info_ok=True, bitmaps=[])
    empty_disk = _obs("leaks", 2, recover=[_recovered(none)])
    empty_disk.qemu.virtual_size, empty_disk.qemu.in_use = 0, ["b0", "b1"]
    assert _props(empty_disk) == {"recovered-keeps-bitmaps"}
    empty_disk.recover[0].drop_broken = True
    assert _props(empty_disk) == set()
    empty_disk.qemu.in_use = ["b0"]
    assert _props(empty_disk) == {"recovered-keeps-bitmaps"}
    empty_disk.qemu.virtual_size, empty_disk.qemu.in_use = 512, ["b0", "b1"]
    assert _props(empty_disk) == {"recovered-keeps-bitmaps"}
    refused = D.Run("api", "error", exit_code=2, detail="RefusedError: no")
    assert _props(_obs("clean", 2, recover=[_recovered(good, run=refused)])) == {
        "refusal-changes-nothing"
    }
    # an image QEMU does not accept: writing is allowed only if nothing gets worse
    assert _props(_obs("refuses", 2, recover=[_recovered(good)])) == set()
    unreadable = _recovered(good, compare=4, baseline=4)  # QEMU cannot read the mutant's data
    assert _props(_obs("errors", 2, recover=[unreadable])) == set()
    assert _props(_obs("clean", 4, recover=[unreadable])) == set()
    assert _props(_obs("errors", 2, recover=[_recovered(good, compare=1)])) == {"never-worse"}
    refuses = D.QemuView("refuses", "Could not open", info_ok=False)
    assert _props(_obs("errors", 2, recover=[_recovered(refuses, compare=2)])) == {"never-worse"}
