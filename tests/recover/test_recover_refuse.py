"""recover refuses corrupt images (exit 2) and, with --drop-broken, removes broken bitmaps."""

from __future__ import annotations

import json
import shutil
import struct

import corrupt
import pytest
import qemu
from crashdisk import CrashingDisk, SimulatedCrash
from recover_helpers import SIZE, assert_qemu_accepts, run_cli, sha


def _poke_table_entry(path, name, index, mask):
    entry = next(e for e in qemu.bitmap_directory(path) if e["name"] == name)
    at = entry["table_offset"] + 8 * index
    with open(path, "r+b") as f:
        f.seek(at)
        word = struct.unpack(">Q", f.read(8))[0] | mask
        f.seek(at)
        f.write(struct.pack(">Q", word))


def _image(tmp_path):
    image = qemu.create_image(tmp_path / "d.qcow2", SIZE)
    qemu.add_bitmap(image, "b2")
    qemu.qemu_io_write(image, [(0, 1 << 20)], pattern=0x44)  # b2 stored with data at close
    qemu.crash_image(image, [(8 << 20, 4096)], bitmaps=("b0",))
    # The crashed QEMU flagged b2 in use too; make it the consistent bitmap it was stored as.
    qemu.edit_bitmap_flags(image, "b2", clear_mask=1)
    return image


def test_corrupt_bitmap_refused_without_drop_broken(tmp_path):
    image = _image(tmp_path)
    _poke_table_entry(image, "b2", 0, 0x2)  # a reserved bit: QEMU no longer opens the image
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    before = sha(image)
    result = run_cli("recover", "--mode", "full", image)
    assert result.exit_code == 2, result.output
    assert "--drop-broken" in result.stderr and "b2" in result.stderr
    assert sha(image) == before


def test_drop_broken_removes_it_and_qemu_opens_again(tmp_path):
    image = _image(tmp_path)
    _poke_table_entry(image, "b2", 0, 0x2)
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    actions = {b["name"]: b["action"] for b in report["bitmaps"]}
    assert actions == {"b2": "dropped", "b0": "recovered"}, report
    dropped = next(b for b in report["bitmaps"] if b["name"] == "b2")
    # Its table is verifiably its own; the data cluster behind the broken entry is not
    # counted as referenced (QEMU skips invalid entries too), so it is a leak, reclaimed as one.
    assert dropped["freed_clusters"] == 1
    assert report["leaked_clusters_reclaimed"] == 1
    assert set(qemu.img_bitmaps(image)) == {"b0"}
    assert_qemu_accepts(image, names=("b0",))


def test_image_metadata_corruption_is_refused_even_with_drop_broken(tmp_path):
    image = _image(tmp_path)
    # A refcount table entry with reserved bits set: the refcounts cannot be trusted.
    with open(image, "r+b") as f:
        f.seek(48)
        reftable = struct.unpack(">Q", f.read(8))[0]
        f.seek(reftable)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(reftable)
        f.write(struct.pack(">Q", word | 0x1))
    before = sha(image)
    result = run_cli("recover", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 2, result.output
    assert "outside the bitmaps" in result.stderr
    assert sha(image) == before


def test_corrupt_bit_refused(tmp_path):
    image = _image(tmp_path)
    with open(image, "r+b") as f:
        f.seek(79)
        f.write(bytes([2]))
    result = run_cli("recover", "--mode", "full", image)
    assert result.exit_code == 2 and "corrupt bit" in result.stderr


def test_leaks_of_a_killed_run_are_reclaimed_unless_keep_leaks(tmp_path):
    import pytest

    from qbitmap.recover import Options, recover

    image = _image(tmp_path)
    # Kill the run right after its commit: recovered, old clusters leaked.
    probe = tmp_path / "p.qcow2"
    probe.write_bytes(image.read_bytes())
    holder = {}
    recover(
        probe,
        Options(mode="full"),
        disk_wrapper=lambda d: holder.setdefault("d", CrashingDisk(d, None)),
    )
    log = holder["d"].log
    after_commit = (
        next(i for i, (kind, off, length) in enumerate(log) if kind == "write" and off == 0) + 2
    )
    with pytest.raises(SimulatedCrash):
        recover(image, Options(mode="full"), disk_wrapper=lambda d: CrashingDisk(d, after_commit))
    rc, report = qemu.img_check(image)
    assert rc == 3 and report["leaks"] > 0
    assert "in-use" not in qemu.img_bitmaps(image)["b0"]["flags"]
    result = run_cli("recover", "--json", "--keep-leaks", image)
    assert json.loads(result.stdout)["status"] == "nothing-to-do"
    assert qemu.img_check(image)[0] == 3
    result = run_cli("recover", "--json", image)
    out = json.loads(result.stdout)
    assert (
        out["status"] == "leaks-reclaimed" and out["leaked_clusters_reclaimed"] == report["leaks"]
    )
    assert_qemu_accepts(image, names=("b0",))


def _clear_autoclear_bit0(image):
    """What a program without bitmap support does when it writes the image."""
    with open(image, "r+b") as f:
        f.seek(88)
        word = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", word & ~1))


def test_ignored_bitmaps_extension_is_brought_back_by_a_full_recovery(tmp_path):
    image = _image(tmp_path)
    _clear_autoclear_bit0(image)
    assert qemu.img_bitmaps(image) == {}
    rc, report = qemu.img_check(image)
    assert rc == 3 and report["leaks"] > 0  # to QEMU the bitmaps' clusters are leaks
    check = run_cli("check", "--json", image)
    assert check.exit_code == 4, check.stdout  # stale, and recover can bring them back
    assert {b["status"] for b in json.loads(check.stdout)["bitmaps"]} == {"ignored"}
    result = run_cli("recover", "--json", "--mode", "full", image)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "recovered"
    assert {b["name"]: b["action"] for b in out["bitmaps"]} == {
        "b0": "recovered",
        "b2": "recovered",
    }
    # QEMU sees both again, consistent, every bit set: a program that did not track writes
    # wrote the image, so only "everything changed" is safe.
    assert set(qemu.img_bitmaps(image)) == {"b0", "b2"}
    assert_qemu_accepts(image, names=("b0", "b2"))
    for name in ("b0", "b2"):
        assert qemu.nbd_dirty_extents(image, name) == [(0, SIZE)]


def test_ignored_extension_without_a_mode_is_refused_and_names_the_choices(tmp_path):
    image = _image(tmp_path)
    _clear_autoclear_bit0(image)
    before = sha(image)
    result = run_cli("recover", image)
    assert result.exit_code == 1, result.output
    for choice in ("--mode full", "--reference", "--drop-broken"):
        assert choice in result.stderr
    assert sha(image) == before


def test_drop_broken_drops_an_ignored_extension_and_frees_its_clusters(tmp_path):
    image = _image(tmp_path)
    _clear_autoclear_bit0(image)
    leaks = qemu.img_check(image)[1]["leaks"]
    result = run_cli("recover", "--json", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {b["action"] for b in out["bitmaps"]} == {"dropped"}
    assert out["clusters_freed"] == leaks
    assert 0x23852875 not in [m for _o, m, _d in qemu.header_extensions(image)]
    assert qemu.img_check(image)[0] == 0
    assert qemu.img_bitmaps(image) == {}


def test_ignored_extension_whose_clusters_were_freed_is_not_brought_back(tmp_path):
    """'qemu-img check -r leaks' by a program that keeps the extension freed its clusters."""
    image = _image(tmp_path)
    _clear_autoclear_bit0(image)
    entry = next(e for e in qemu.bitmap_directory(image) if e["name"] == "b2")
    _set_refcount(image, entry["table_offset"], 0)
    check = run_cli("check", "--json", image)
    assert check.exit_code == 2
    assert "bitmaps-extension-lost" in {f["code"] for f in json.loads(check.stdout)["findings"]}
    before = sha(image)
    result = run_cli("recover", "--mode", "full", image)
    assert result.exit_code == 2, result.output
    assert "--drop-broken" in result.stderr
    assert sha(image) == before


def _set_refcount(image, offset, value):
    """Set the 16-bit refcount of the cluster at *offset* (first refcount block only)."""
    with open(image, "rb") as f:
        head = f.read(104)
    cluster_bits = struct.unpack(">I", head[20:24])[0]
    reftable = struct.unpack(">Q", head[48:56])[0]
    with open(image, "r+b") as f:
        f.seek(reftable)
        block = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
        f.seek(block + 2 * (offset >> cluster_bits))
        f.write(struct.pack(">H", value))


def test_drop_broken_with_a_broken_directory_removes_the_extension(tmp_path):
    image = _image(tmp_path)
    # nb_bitmaps says 3, the directory holds 2: QEMU refuses the image.
    ext_off = next(o for o, m, _d in qemu.header_extensions(image) if m == 0x23852875)
    with open(image, "r+b") as f:
        f.seek(ext_off + 8)
        f.write(struct.pack(">I", 3))
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    assert run_cli("recover", "--mode", "full", image).exit_code == 2
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {b["action"] for b in out["bitmaps"]} == {"dropped"}
    assert qemu.img_bitmaps(image) == {}
    rc, report = qemu.img_check(image)
    assert report.get("corruptions", 0) == 0 and rc in (0, 3)
    # Nothing could prove who owned the old bitmap clusters; once the extension is gone they
    # are plain leaks, which the next run frees.
    again = json.loads(run_cli("recover", "--json", image).stdout)
    assert again["status"] in ("leaks-reclaimed", "nothing-to-do")
    assert qemu.img_check(image)[0] == 0


# -- the class: every edit of the corruption catalogue ------------------------------------------


def _refusal_expected(image) -> bool:
    """Recover must not write: something outside the bitmaps is unsound, the image is a v2
    image (QEMU keeps no bitmaps there), or it is marked dirty (refcounts not yet repaired)."""
    from qbitmap.check import Severity, check_path

    report = check_path(image)
    return any(
        (f.area == "image" and f.severity in (Severity.CORRUPT, Severity.FAILED))
        or f.code in ("image-dirty", "bitmaps-extension-v2")
        for f in report.findings
    )


@pytest.mark.parametrize("edit", sorted(corrupt.EDITS))
def test_recover_never_makes_a_catalogue_image_worse(edit, base_image, tmp_path):
    """Refuse with no byte changed, or leave an image QEMU takes, with the same guest data.

    For every one-field edit of a QEMU-made image: when anything outside the
    bitmaps is unsound (or the image is v2, or marked dirty), recover refuses
    (exit 2, or 1 when the file is not an image it can write) even with
    --drop-broken, and the file is unchanged.  Otherwise a full recovery with
    --drop-broken succeeds, QEMU opens the result read-write, qemu-img check
    reports no errors, the guest data is unchanged, and every bitmap QEMU
    accepted before is still there.
    """
    image = corrupt.apply(base_image, tmp_path / "image.qcow2", edit)
    pristine = tmp_path / "before.qcow2"
    shutil.copyfile(image, pristine)
    before = sha(image)
    accepted = qemu.qemu_img("info", "-U", image, check=False).returncode == 0
    bitmaps_before = set(qemu.img_bitmaps(image)) if accepted else set()
    if _refusal_expected(image):
        for args in (("--mode", "full"), ("--mode", "full", "--drop-broken")):
            result = run_cli("recover", *args, image)
            assert result.exit_code in (1, 2), (edit, args, result.output)
            assert sha(image) == before, (edit, args)
        return
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, (edit, result.output)
    copy = tmp_path / "opened.qcow2"
    shutil.copyfile(image, copy)
    opened = qemu.opens_read_write(copy)
    assert opened.returncode == 0, (edit, opened.stderr)
    rc, report = qemu.img_check(image)
    assert report.get("corruptions", 0) == 0 and rc in (0, 3), (edit, report)
    # The guest data as QEMU read it before, in a fresh image (a read-write open of the
    # edited copy would let QEMU itself free clusters a bogus bitmap points at).  When QEMU
    # could not open the edited copy, the edit touched bitmap metadata only: the base
    # image holds the same guest data.
    expected = tmp_path / "expected.qcow2"
    if accepted:
        qemu.qemu_img("convert", "-U", "-f", "qcow2", "-O", "qcow2", pristine, expected)
    else:
        shutil.copyfile(base_image, expected)
    assert qemu.images_identical(expected, image), edit
    assert bitmaps_before <= set(qemu.img_bitmaps(image)), (edit, bitmaps_before)
    # Ordinary QEMU writes that allocate clusters afterwards change nothing else: no
    # cluster recover released is still in use.
    for path in (image, expected):
        qemu.qemu_io(path, "write -P 0x5a 10M 4M")
    assert qemu.images_identical(expected, image), f"{edit}: a later QEMU write changed other data"
    assert qemu.img_check(image)[1].get("corruptions", 0) == 0, edit


# -- a disk of 0 bytes -------------------------------------------------------------------------


def test_in_use_bitmaps_of_a_zero_byte_disk_are_refused_not_brought_back(tmp_path):
    image = corrupt.zero_byte_disk_with_in_use_bitmaps(tmp_path / "z.qcow2")
    before = sha(image)
    result = run_cli("recover", "--mode", "full", image)
    assert result.exit_code == 2, result.output
    assert "bitmap-disk-size-zero" in result.stderr and "--drop-broken" in result.stderr
    assert sha(image) == before
    # Still what QEMU accepts: both bitmaps listed, in use.
    assert set(qemu.img_bitmaps(image)) == {"b0", "b1"}


def test_drop_broken_drops_the_bitmaps_of_a_zero_byte_disk_and_only_their_clusters(tmp_path):
    image = corrupt.zero_byte_disk_with_in_use_bitmaps(tmp_path / "z.qcow2")
    copy = tmp_path / "before.qcow2"
    shutil.copyfile(image, copy)
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {b["name"]: b["action"] for b in out["bitmaps"]} == {"b0": "dropped", "b1": "dropped"}
    rc, report = qemu.img_check(image)
    assert rc == 0 and not report.get("corruptions") and not report.get("leaks"), report
    assert qemu.img_bitmaps(image) == {}
    qemu.qemu_io(image, "quit")  # a read-write open and close: nothing to complain about
    compare = qemu.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", copy, image, check=False)
    assert compare.returncode == 0, compare.stdout


def test_no_bitmap_is_created_on_a_zero_byte_disk(tmp_path):
    from qbitmap.errors import RefusedError
    from qbitmap.recover import NewBitmap, Options, recover

    image = qemu.create_image(tmp_path / "empty.qcow2", 0)
    before = sha(image)
    with pytest.raises(RefusedError, match="0 bytes"):
        recover(image, Options(create=(NewBitmap("cp1", 65536),)))
    assert sha(image) == before


# -- names QEMU refuses in an ignored extension --------------------------------------------------


def _ignored_with_c_string_duplicate(tmp_path):
    """b0 and b2 left by QEMU, b2 renamed b"b0\\0x" (b0 to QEMU), then autoclear bit 0 cleared."""
    image = _image(tmp_path)
    corrupt.rewrite_directory(
        lay := corrupt.layout(image),
        [(e, b"", b"b0\0x" if e.name == b"b2" else e.name) for e in lay.entries],
    )
    _clear_autoclear_bit0(image)
    assert qemu.img_bitmaps(image) == {}  # QEMU ignores the extension
    return image


def test_ignored_extension_with_names_qemu_refuses_is_not_brought_back_as_it_is(tmp_path):
    image = _ignored_with_c_string_duplicate(tmp_path)
    check = run_cli("check", "--json", image)
    assert check.exit_code == 2, check.stdout
    codes = {f["code"] for f in json.loads(check.stdout)["findings"]}
    assert {"bitmaps-extension-ignored", "bitmap-name-duplicate"} <= codes
    before = sha(image)
    result = run_cli("recover", "--mode", "full", image)
    assert result.exit_code == 2, result.output
    assert "bitmap-name-duplicate" in result.stderr and "--drop-broken" in result.stderr
    assert sha(image) == before


def test_drop_broken_brings_an_ignored_extension_back_without_the_duplicate(tmp_path):
    image = _ignored_with_c_string_duplicate(tmp_path)
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    actions = {b["name"]: b["action"] for b in out["bitmaps"]}
    # The first entry keeps the name, as QEMU keeps the first of a live directory's duplicates.
    assert actions == {"b0\x00x": "recovered", "b0": "dropped"}, out
    # QEMU opens the image again, with b0 (every bit set), and nothing leaked
    assert set(qemu.img_bitmaps(image)) == {"b0"}
    assert_qemu_accepts(image, names=("b0",))
    assert qemu.nbd_dirty_extents(image, "b0") == [(0, SIZE)]


def test_an_ignored_entry_qemu_cannot_store_comes_back_under_its_qemu_name(tmp_path):
    image = _image(tmp_path)
    # b"\0ig": QEMU would know it as "" and fail to store the directory back
    corrupt.rewrite_directory(
        lay := corrupt.layout(image),
        [(e, b"", b"\0ig" if e.name == b"b2" else e.name) for e in lay.entries],
    )
    _clear_autoclear_bit0(image)
    before = sha(image)
    assert run_cli("recover", "--mode", "full", image).exit_code == 2
    assert sha(image) == before
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    bitmaps = qemu.img_bitmaps(image)
    assert set(bitmaps) == {"b0", ""}
    assert not any("in-use" in b["flags"] for b in bitmaps.values()), bitmaps
    rc, report = qemu.img_check(image)
    assert rc == 0 and not report.get("leaks") and not report.get("corruptions"), report
    qemu.qemu_io(image, "quit")  # stores the directory back: the entry fits QEMU's copy
    assert set(qemu.img_bitmaps(image)) == {"b0", ""}


# -- a directory cut short by the end of the file ------------------------------------------------


def _directory_last_in_the_file(tmp_path):
    """Two bitmaps stored by QEMU at a clean close: their directory is the file's last bytes."""
    image = qemu.create_image(tmp_path / "cut.qcow2", 64 * 1024 * 1024)
    qemu.add_bitmap(image, "b0")
    qemu.add_bitmap(image, "b1")
    qemu.qemu_io_write(image, [(0, 1 << 20)], pattern=0x44)
    lay = corrupt.layout(image)
    assert lay.dir_offset + lay.dir_size == lay.file_size, "the recipe no longer ends the file"
    return image, lay


@pytest.mark.parametrize("drop_broken", [False, True])
def test_a_directory_cut_short_that_qemu_loads_is_never_dropped(tmp_path, drop_broken):
    image, lay = _directory_last_in_the_file(tmp_path)
    with open(image, "r+b") as f:
        f.truncate(lay.file_size - 1)  # a byte of the last entry's padding
    # QEMU reads the missing byte as zero: it accepts the image and loads both bitmaps.
    assert qemu.img_check(image)[0] == 0
    assert set(qemu.img_bitmaps(image)) == {"b0", "b1"}
    before = sha(image)
    args = ["recover", "--mode", "full", *(["--drop-broken"] if drop_broken else []), image]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert "cut short by the end of the file" in result.stderr
    assert f"to {lay.file_size} bytes" in result.stderr
    assert sha(image) == before
    assert set(qemu.img_bitmaps(image)) == {"b0", "b1"}


def test_a_directory_wholly_past_the_end_of_the_file_is_still_dropped(tmp_path):
    image, lay = _directory_last_in_the_file(tmp_path)
    with open(image, "r+b") as f:
        f.truncate(lay.dir_offset)  # QEMU reads a directory of zeros, and refuses it
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    assert qemu.img_bitmaps(image) == {}
    assert qemu.img_check(image)[0] == 0


def test_a_directory_cut_short_with_another_fault_qemu_refuses_is_still_dropped(tmp_path):
    image, lay = _directory_last_in_the_file(tmp_path)
    with open(image, "r+b") as f:
        f.truncate(lay.file_size - 1)
    corrupt.poke(image, lay.ext_offset + 8 + 4, ">I", 1)  # the extension's reserved field
    assert qemu.qemu_img("info", "-U", image, check=False).returncode != 0
    result = run_cli("recover", "--json", "--mode", "full", "--drop-broken", image)
    assert result.exit_code == 0, result.output
    assert qemu.img_bitmaps(image) == {}
    assert qemu.img_check(image)[0] == 0
