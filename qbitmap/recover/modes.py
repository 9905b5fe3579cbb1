"""The recovery modes, by name: the one list the engine checks and the CLI offers.

Standard library only: the command line builds its ``--mode`` choice from it
at start-up, before anything heavy is imported.
"""

from __future__ import annotations

#: ``auto`` picks ``level`` when a trusted consistency-level record exists,
#: else ``reference`` when a reference copy is given, else refuses.
MODES: tuple[str, ...] = ("auto", "full", "reference", "level")
