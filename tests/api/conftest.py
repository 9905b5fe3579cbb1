"""Fixtures of the API tests: the helpers of the check and recover tests, whose reports the
API must reproduce."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for helpers in ("check", "recover"):
    sys.path.insert(0, str(TESTS / helpers))

from recover_helpers import crashed, crashed_template  # noqa: F401 - fixtures
