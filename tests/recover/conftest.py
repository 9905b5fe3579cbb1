from __future__ import annotations

from recover_helpers import crashed, crashed_template  # noqa: F401 - fixtures
