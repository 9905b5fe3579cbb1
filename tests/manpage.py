"""Helpers for the tests that keep the man pages in step with the code."""

from __future__ import annotations

import re


def plain(roff: str) -> str:
    """The roff source with the escapes our pages use turned into plain characters."""
    return roff.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-")


def section(text: str, name: str) -> str:
    """The body of top-level section (.SH) *name*; fails the test if there is none."""
    match = re.search(rf"^\.SH \"?{name}\"?\n(.*?)(?=^\.SH |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {name}"
    return match.group(1)
