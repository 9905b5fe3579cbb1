"""Fixtures of the ``qbitmap check`` tests: the base image and an in-process runner."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import corrupt
import qemu

from qbitmap.cli import cli


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pristine base image of the corruption catalogue (read-only: copy it)."""
    qemu.require_tools("qemu-img", "qemu-io")
    path = tmp_path_factory.mktemp("check-base") / "base.qcow2"
    return corrupt.make_base(path)


@pytest.fixture
def base_copy(base_image: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "image.qcow2"
    shutil.copyfile(base_image, dest)
    return dest


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def codes(self) -> set[str]:
        return {f["code"] for f in self.json["findings"]}


def run_check(*args: str | Path) -> Run:
    """``qbitmap check ARGS`` in-process through click's CliRunner."""
    runner = CliRunner()
    result = runner.invoke(cli, ["check", *map(str, args)], catch_exceptions=False)
    return Run(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def check_cli():
    return run_check
