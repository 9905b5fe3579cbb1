"""Adding bitmaps with every change marked, and re-enabling disabled ones, through recover's engine.

What ``qbitmap checkpoints --repair`` asks of the engine for a checkpoint
whose bitmap is missing (``Options.create``) or not recording
(``Options.enable``), next to the recovery of in-use bitmaps, in one run
and one commit.  QEMU is the judge: ``qemu-img check`` clean, a read-write
open accepted, and the dirty map QEMU exports over NBD covering the disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import corrupt
import pytest
import qemu
from recover_helpers import (
    CRASH_WRITES,
    SIZE,
    STORED_WRITES,
    clean,
    crash_sweep,
    granules,
    no_corruption,
    sha,
)

from qbitmap.errors import ImageBusyError, RefusedError, UsageError
from qbitmap.recover import NewBitmap, Options, prepare, recover

MiB = 1 << 20
CREATE = (NewBitmap("new", 65536), NewBitmap("fine", 4096))


@pytest.fixture(scope="module")
def mixed_template(tmp_path_factory) -> tuple[Path, Path]:
    """'old' consistent and recording, 'off' disabled, 'crashed' in use; guest data around."""
    qemu.require_tools("qemu-img", "qemu-io", "qemu-storage-daemon")
    tmp = tmp_path_factory.mktemp("mixed")
    image = qemu.create_image(tmp / "t.qcow2", SIZE)
    qemu.add_bitmap(image, "old")
    qemu.add_bitmap(image, "off", granularity=1 << 20)
    qemu.qemu_io_write(image, [(0, MiB), (100 * MiB, 2 * MiB)], pattern=0x61)
    qemu.bitmap_op(image, "off", "--disable")
    qemu.crash_image(image, [(30 * MiB, 4096)], bitmaps=("crashed",))
    # The killed QEMU left every bitmap in use; 'old' and 'off' were stored consistent before.
    qemu.edit_bitmap_flags(image, "old", clear_mask=1)
    qemu.edit_bitmap_flags(image, "off", clear_mask=1)
    expected = tmp / "expected.qcow2"
    qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", image, expected)
    return image, expected


@pytest.fixture
def mixed(mixed_template, tmp_path) -> Path:
    image = tmp_path / "t.qcow2"
    shutil.copyfile(mixed_template[0], image)
    return image


OPTIONS = Options(names=("crashed",), mode="full", create=CREATE, enable=("off",))


def test_one_run_creates_enables_and_recovers_and_qemu_accepts_it(mixed, tmp_path):
    old_extents = qemu.nbd_dirty_extents(mixed, "old")
    report = recover(mixed, OPTIONS)
    assert report.status == "recovered"
    actions = {b.name: (b.action, b.mode, b.granularity) for b in report.bitmaps}
    assert actions == {
        "crashed": ("recovered", "full", 65536),
        "off": ("enabled", "full", 1 << 20),
        "new": ("created", "full", 65536),
        "fine": ("created", "full", 4096),
    }
    assert [s["action"] for s in report.steps].count("header") == 1  # one commit
    rc, check = qemu.img_check(mixed)
    assert rc == 0 and check.get("leaks", 0) == 0, check
    bitmaps = qemu.img_bitmaps(mixed)
    assert {n: (b["flags"], b["granularity"]) for n, b in bitmaps.items()} == {
        "old": (["auto"], 65536),
        "off": (["auto"], 1 << 20),
        "crashed": (["auto"], 65536),
        "new": (["auto"], 65536),
        "fine": (["auto"], 4096),
    }
    for name in ("off", "crashed", "new", "fine"):
        assert qemu.nbd_dirty_extents(mixed, name) == [(0, SIZE)], name
    assert qemu.nbd_dirty_extents(mixed, "old") == old_extents  # left alone
    copy = tmp_path / "rw.qcow2"
    shutil.copyfile(mixed, copy)
    opened = qemu.opens_read_write(copy)
    assert opened.returncode == 0, opened.stderr


def test_create_in_an_image_without_bitmaps(tmp_path):
    image = qemu.create_image(tmp_path / "plain.qcow2", 10 * MiB + 512, cluster_size=4096)
    qemu.qemu_io_write(image, [(0, MiB)], pattern=0x62)
    report = recover(image, Options(create=(NewBitmap("cp1", 4096),)))
    assert [(b.name, b.action) for b in report.bitmaps] == [("cp1", "created")]
    clean(image)
    assert qemu.img_bitmaps(image)["cp1"]["flags"] == ["auto"]
    assert qemu.nbd_dirty_extents(image, "cp1") == [(0, 10 * MiB + 512)]
    assert qemu.opens_read_write(image).returncode == 0


def test_a_bitmap_created_from_a_reference_marks_what_differs(crashed):
    """The reference holds the guest data as of the bitmap's moment: what changed is marked."""
    report = recover(
        crashed.image,
        Options(
            reference=crashed.backup,
            create=(
                NewBitmap("since", 65536, mode="reference"),
                NewBitmap("since-fine", 4096, mode="reference"),
                NewBitmap("all", 65536),
            ),
        ),
    )
    assert {b.name: b.mode for b in report.bitmaps} == {
        "since": "reference",
        "since-fine": "reference",
        "all": "full",
    }
    assert report.reference is not None and report.reference["differing_granules"] > 0
    changed = STORED_WRITES + CRASH_WRITES
    assert qemu.nbd_dirty_extents(crashed.image, "since") == granules(changed, 65536)
    assert qemu.nbd_dirty_extents(crashed.image, "since-fine") == granules(changed, 4096)
    assert qemu.nbd_dirty_extents(crashed.image, "all") == [(0, SIZE)]
    # The in-use bitmaps were not asked for: still in use, the image otherwise clean.
    flags = {n: b["flags"] for n, b in qemu.img_bitmaps(crashed.image).items()}
    assert flags["b0"] == ["in-use", "auto"] and flags["since"] == ["auto"]


def _rerun(image: Path) -> Options:
    """What is still to do after a crash: the run that finishes the job."""
    have = qemu.img_bitmaps(image)
    create = tuple(b for b in CREATE if b.name not in have)
    enable = tuple(n for n in ("off",) if "auto" not in have[n]["flags"])
    if create or enable:
        stale = tuple(n for n, b in have.items() if "in-use" in b["flags"])
        return Options(names=stale, mode="full", create=create, enable=enable)
    return Options(mode="full")  # recovers what is still in use, frees the leaks


def test_creating_and_enabling_survive_a_crash_anywhere(mixed_template, tmp_path):
    template, expected = mixed_template

    def after_crash(path: Path) -> None:
        no_corruption(path)
        have = qemu.img_bitmaps(path)
        before = {"old", "off", "crashed"}
        assert set(have) in (before, before | {"new", "fine"}), have  # all at once or none
        if "new" in have:
            assert have["off"]["flags"] == ["auto"] and have["crashed"]["flags"] == ["auto"]
            assert qemu.nbd_dirty_extents(path, "new") == [(0, SIZE)]
        else:
            assert have["off"]["flags"] == [] and have["crashed"]["flags"] == ["in-use", "auto"]

    def at_the_end(path: Path) -> None:
        clean(path)
        have = qemu.img_bitmaps(path)
        assert all(b["flags"] == ["auto"] for b in have.values()), have
        for name in ("off", "crashed", "new", "fine"):
            assert qemu.nbd_dirty_extents(path, name) == [(0, SIZE)], name

    total = crash_sweep(
        template,
        OPTIONS,
        tmp_path,
        expected_data=expected,
        after_crash=after_crash,
        at_the_end=at_the_end,
        rerun=_rerun,
    )
    assert total >= 10


# -- refusals: nothing written ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (Options(create=(NewBitmap("old", 65536),)), "already exists"),
        (Options(enable=("nope",)), "no bitmap named 'nope'"),
        (Options(names=("nope",), create=(NewBitmap("x", 65536),)), "no bitmap named 'nope'"),
        (Options(create=(NewBitmap("x", 3000),)), "granularity 3000"),
        (Options(create=(NewBitmap("x", 256),)), "granularity 256"),
        (Options(create=(NewBitmap("", 65536),)), "a name is 1 to 1023 bytes"),
        (Options(create=(NewBitmap("a\0b", 65536),)), "without a NUL byte"),
        (Options(create=(NewBitmap("x", 65536), NewBitmap("x", 4096))), "created twice"),
        (Options(create=(NewBitmap("x", 65536, mode="reference"),)), "needs a reference"),
        (Options(create=(NewBitmap("x", 65536),), drop_broken=True), "--drop-broken"),
    ],
    ids=[
        "exists",
        "enable-unknown",
        "recover-unknown",
        "granularity-not-a-power-of-two",
        "granularity-too-fine",
        "empty-name",
        "nul-in-name",
        "twice",
        "reference-missing",
        "with-drop-broken",
    ],
)
def test_usage_errors_change_nothing(mixed, options, words):
    before = sha(mixed)
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        recover(mixed, options)
    assert sha(mixed) == before


def test_a_bitmap_too_large_for_qemu_is_refused(tmp_path):
    image = qemu.create_image(tmp_path / "huge.qcow2", "4T")
    before = sha(image)
    with pytest.raises(UsageError, match="larger granularity"):
        recover(image, Options(create=(NewBitmap("x", 512),)))
    assert sha(image) == before


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ("l2-entry-reserved-bit", "outside the bitmaps is unsound"),
        ("type-2", "bitmap metadata is corrupt"),
        ("autoclear-bit0-clear", "QEMU ignores the bitmaps extension"),
        ("incompat-dirty-bit", "dirty bit"),
    ],
)
def test_what_recover_refuses_is_refused_for_creating_too(edit, words, base_image, tmp_path):
    image = corrupt.apply(base_image, tmp_path / f"{edit}.qcow2", edit)
    before = sha(image)
    for options in (Options(create=(NewBitmap("cp9", 65536),)), Options(enable=("b1",))):
        with pytest.raises(RefusedError, match=words):
            recover(image, options)
        assert sha(image) == before


def test_a_held_image_is_left_alone(mixed):
    before = sha(mixed)
    with (
        qemu.StorageDaemon(mixed, writable=False, read_only=True),
        pytest.raises(ImageBusyError),
    ):
        recover(mixed, OPTIONS)
    assert sha(mixed) == before


def test_prepared_runs_write_nothing_until_applied(mixed, tmp_path):
    """prepare() decides on a locked image; leaving it unapplied changes no byte."""
    other = tmp_path / "other.qcow2"
    shutil.copyfile(mixed, other)
    before = sha(mixed)
    with prepare(mixed, OPTIONS) as first:
        assert first.has_work()
        # The second image refuses: the first is not applied.
        with pytest.raises(UsageError), prepare(other, Options(create=(NewBitmap("old", 65536),))):
            pass
    assert sha(mixed) == before
    with prepare(mixed, OPTIONS) as run:
        with pytest.raises(ImageBusyError):  # held by the prepared run: a writer is kept out
            recover(mixed, OPTIONS)
        report = run.apply()
    assert report.status == "recovered"
    assert set(qemu.img_bitmaps(mixed)) == {"old", "off", "crashed", "new", "fine"}
