"""Fixtures of the ``qbitmap check`` tests: the pristine base image of the catalogue."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import corrupt
import qemu


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pristine base image of the corruption catalogue (read-only: copy it)."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("check-base") / "base.qcow2"
    return corrupt.make_base(path)
