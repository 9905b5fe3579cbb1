"""Fixtures shared by the test packages."""

from __future__ import annotations

from pathlib import Path

import corrupt
import pytest
import qemu


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pristine base image of the corruption catalogue (corrupt.py; copy it before use)."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("catalogue-base") / "base.qcow2"
    return corrupt.make_base(path)
