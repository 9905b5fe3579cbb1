"""Fixtures of the API tests: the helpers of the check and recover tests, whose reports the
API must reproduce."""

from __future__ import annotations

from recover_helpers import crashed, crashed_template  # noqa: F401 - fixtures
