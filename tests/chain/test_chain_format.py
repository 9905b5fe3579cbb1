"""Backing chains are followed as QEMU follows them (qemu-img info --backing-chain is the judge)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import qemu
from chain_helpers import (
    SIZE,
    drop_backing_format_extension,
    make_chain,
    qemu_chain,
    set_backing_name,
)

from qbitmap.errors import ImageFormatError, ImageIOError
from qbitmap.format.chain import open_chain, protocol_of


def layers(path: Path) -> list[tuple[str, str]]:
    with open_chain(path) as chain:
        assert chain.error is None, chain.error
        return [(layer.filename, layer.format) for layer in chain.layers]


def test_relative_names_resolve_against_the_image_directory(tmp_path, monkeypatch):
    top = make_chain(tmp_path)[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    given = Path(os.path.relpath(top, elsewhere))  # ../top.qcow2
    assert layers(given) == qemu_chain(given)
    assert [f for f, _ in layers(given)] == ["../top.qcow2", "../mid1.qcow2", "../base.qcow2"]


def test_absolute_names_and_the_file_prefix(tmp_path):
    top, mid, base = make_chain(tmp_path)
    set_backing_name(top, str(mid).encode())
    set_backing_name(mid, b"file:" + str(base).encode())
    assert layers(top) == qemu_chain(top)
    assert layers(top)[2] == (str(base), "qcow2")


def test_a_symlinked_image_resolves_names_from_the_link_directory(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    top = make_chain(sub, depth=2)[0]
    link = tmp_path / "link.qcow2"
    link.symlink_to(top)
    # QEMU does not follow the link first: 'base.qcow2' is looked for next to the link.
    proc = qemu.qemu_img("info", "-U", "--backing-chain", link, check=False)
    assert proc.returncode != 0 and "base.qcow2" in proc.stderr
    with open_chain(link) as chain:
        assert chain.error is not None and chain.error.kind == "missing"
        assert chain.error.name == "base.qcow2"
        assert str(tmp_path / "base.qcow2") in chain.error.message


def test_raw_bottom_layer(tmp_path):
    top = make_chain(tmp_path, raw_bottom=True)[0]
    with open_chain(top) as chain:
        assert [(x.filename, x.format) for x in chain.layers] == qemu_chain(top)
        bottom = chain.layers[-1]
        assert bottom.format == "raw" and bottom.format_source == "extension"
        assert bottom.virtual_size == SIZE and bottom.index not in chain.images


@pytest.mark.parametrize("below", ["raw", "qcow2"])
def test_format_is_probed_without_the_extension(tmp_path, below):
    top = make_chain(tmp_path, depth=2, raw_bottom=below == "raw")[0]
    drop_backing_format_extension(top)
    with open_chain(top) as chain:
        assert chain.layers[0].backing_format is None
        assert chain.layers[1].format == below and chain.layers[1].format_source == "probed"
        assert [(x.filename, x.format) for x in chain.layers] == qemu_chain(top)


@pytest.mark.parametrize(
    ("name", "protocol"),
    [
        (b'json:{"file.driver": "file", "file.filename": "base.qcow2"}', "json"),
        (b"nbd+unix:///vda?socket=/run/x.sock", "nbd+unix"),
        (b"rbd:pool/image", "rbd"),
    ],
)
def test_json_and_protocol_names_are_refused_with_one_sentence(tmp_path, name, protocol):
    top = make_chain(tmp_path, depth=2)[0]
    set_backing_name(top, name)
    with open_chain(top) as chain:
        assert len(chain.layers) == 1
        error = chain.error
        assert error is not None and error.kind == "protocol"
        assert error.name == name.decode()
        assert f"({protocol}: names are not followed" in error.message
        assert "\n" not in error.message


def test_protocol_detection_matches_qemu():
    assert protocol_of("base.qcow2") is None
    assert protocol_of("/abs/with:colon.qcow2") is None  # a '/' before the ':'
    assert protocol_of("./odd:name.qcow2") is None
    assert protocol_of("json:{}") == "json"
    assert protocol_of("file:/x") == "file"


def test_a_missing_backing_file(tmp_path):
    top, mid, _base = make_chain(tmp_path)
    os.unlink(mid)
    with open_chain(top) as chain:
        assert len(chain.layers) == 1
        assert chain.error is not None and chain.error.kind == "missing"
        assert "mid1.qcow2" in chain.error.message and "No such file" in chain.error.message


def test_a_loop_is_reported_not_followed(tmp_path):
    top, _mid, base = make_chain(tmp_path)
    qemu.qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", base)
    proc = qemu.qemu_img("info", "-U", "--backing-chain", top, check=False)
    assert proc.returncode != 0 and "loop" in proc.stderr
    with open_chain(top) as chain:
        assert [x.path.name for x in chain.layers] == ["top.qcow2", "mid1.qcow2", "base.qcow2"]
        assert chain.error is not None and chain.error.kind == "loop"


def test_a_fifo_as_backing_file_does_not_hang(tmp_path):
    top, mid, _base = make_chain(tmp_path)
    os.unlink(mid)
    os.mkfifo(mid)
    with open_chain(top) as chain:
        assert chain.error is not None and "not a regular file" in chain.error.message


def test_a_fifo_as_top_image_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageIOError, match="not a regular file"):
        open_chain(fifo)


def test_a_backing_file_that_is_not_the_format_named(tmp_path):
    top, mid, _base = make_chain(tmp_path)
    mid.write_bytes(b"not an image at all" * 100)
    with open_chain(top) as chain:
        assert chain.error is not None and chain.error.kind == "unreadable"
        assert "not a qcow2 image" in chain.error.message


def test_a_backing_name_qemu_refuses_as_too_long(tmp_path):
    top = make_chain(tmp_path, depth=2)[0]
    set_backing_name(top, b"x" * 1024)
    proc = qemu.qemu_img("info", "-U", top, check=False)
    assert proc.returncode != 0 and "too long" in proc.stderr
    with open_chain(top) as chain:
        assert chain.error is not None and chain.error.kind == "name"
        assert "1023" in chain.error.message


def test_a_chain_deeper_than_the_limit(tmp_path):
    top = make_chain(tmp_path, depth=5)[0]
    with open_chain(top, max_depth=3) as chain:
        assert len(chain.layers) == 3
        assert chain.error is not None and chain.error.kind == "too-deep"


def test_layers_stay_open_until_close(tmp_path):
    top = make_chain(tmp_path)[0]
    chain = open_chain(top)
    fds = [image.fd for image in chain.images.values()]
    assert sorted(chain.images) == [0, 1, 2] and all(fd >= 0 for fd in fds)
    chain.close()
    assert not chain.images
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_top_image_must_be_qcow2(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(ImageFormatError, match="not a qcow2 image"):
        open_chain(raw)
