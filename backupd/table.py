"""Plain-text tables for the CLI (`list --schedule`, `prune`)."""

from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing spaces.

    One '%-Ns' format per line instead of a ljust per cell (prune prints a line per
    backup: 100k and more).
    """
    line = "  ".join([f"%-{max(map(len, column))}s" for column in list(zip(*rows))[:-1]] + ["%s"])
    return "\n".join([(line % tuple(row)).rstrip() for row in rows])
