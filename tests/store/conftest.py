from __future__ import annotations

from store_helpers import img  # noqa: F401 - the fixture
