"""Exclude patterns of a volume: GNU tar patterns anchored at the volume's root.

`cache/*` leaves out what `cache/` holds (the directory itself stays, empty);
`tmp` or `tmp/` leaves out the directory and everything in it. Patterns are
anchored (`*.log` is a file at the root, not anywhere) and `*` does not cross
a `/`, so a pattern means the place it names and no other.

A pattern reaches tar only as `--exclude=./PATTERN`, one argv element whose
value starts with `./`: a pattern beginning with `-` can never be read as an
option, and no pattern can name something outside the volume. What tar
cannot be given safely (NUL, control characters), absolute paths and `..`
are refused when the config is loaded, naming the key.
"""

from __future__ import annotations

from typing import Iterable

# Order matters to tar: --anchored and --no-wildcards-match-slash apply to the --exclude after them.
MATCHING = ["--anchored", "--wildcards", "--no-wildcards-match-slash"]


def normalize(pattern: str) -> str:
    """The pattern as recorded and shown (`./a/` -> `a`); ValueError saying why it is refused."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("an exclude pattern must be a non-empty string")
    bad = next((ch for ch in pattern if ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        raise ValueError(f"exclude pattern {pattern!r} contains control character {bad!r}")
    if pattern.startswith("/"):
        raise ValueError(f"exclude pattern {pattern!r} is absolute: patterns are relative to the volume's root")
    text = pattern
    while text.startswith("./"):
        text = text[2:]
    text = text.rstrip("/")
    parts = text.split("/")
    if not text or text == ".":
        raise ValueError(f"exclude pattern {pattern!r} names the volume itself")
    if ".." in parts:
        raise ValueError(f"exclude pattern {pattern!r} contains '..': patterns stay inside the volume")
    if "" in parts or "." in parts:
        raise ValueError(f"exclude pattern {pattern!r} has an empty or '.' path component")
    return text


def merged(*lists: Iterable[str]) -> tuple[str, ...]:
    """Normalized patterns of several lists (job-level and per volume), first occurrence kept."""
    seen: dict[str, None] = {}
    for patterns in lists:
        for p in patterns:
            seen.setdefault(normalize(p), None)
    return tuple(seen)


def tar_args(patterns: Iterable[str]) -> list[str]:
    """tar options that leave the (normalized) patterns out; nothing when there are none."""
    patterns = list(patterns)
    if not patterns:
        return []
    return [*MATCHING, *(f"--exclude=./{normalize(p)}" for p in patterns)]
