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

Repository mode hands restic the same patterns (restic_args), translated so
that restic leaves out exactly what tar leaves out. restic matches a pattern
with Go's filepath.Match, component by component, against the absolute path
of each file it reads; a pattern that starts with `/` is anchored at the root
and, like tar's, also covers everything below what it matches. So a pattern
becomes `/data/<volume>/PATTERN` with `*` runs collapsed to one (a `**`
component would cross directories in restic; in tar it is `*`). What has no
faithful translation is refused for repository jobs when the config is
loaded: `?` and `[...]` (tar matches them per byte or per character
depending on the helper image's locale, restic per character) and a
trailing backslash.
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


GLOB_SPECIAL = "*?[\\"


def restic_pattern(pattern: str, root: str) -> str:
    """The restic --exclude pattern that leaves out what tar leaves out for `pattern` in a volume
    restic reads at `root` (an absolute path); ValueError saying why there is none."""
    parts = [_restic_component(part, pattern) for part in normalize(pattern).split("/")]
    return "/".join([escape_glob(root.rstrip("/")), *parts])


def escape_glob(text: str) -> str:
    """`text` as a filepath.Match pattern that matches it literally."""
    return "".join("\\" + ch if ch in GLOB_SPECIAL else ch for ch in text)


def _restic_component(part: str, pattern: str) -> str:
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch in "?[":
            raise ValueError(f"exclude pattern {pattern!r} uses {ch!r}: format: repository cannot match it as "
                             "tar does (tar matches it per byte or per character depending on the locale, "
                             "restic per character); use '*' or name the files")
        if ch == "\\":
            if i + 1 == len(part):
                raise ValueError(f"exclude pattern {pattern!r} has a backslash that escapes nothing")
            out.append(part[i:i + 2])
            i += 2
            continue
        if ch == "*":
            while i + 1 < len(part) and part[i + 1] == "*":
                i += 1  # tar's `**` is `*`; a `**` component would cross directories in restic
        out.append(ch)
        i += 1
    return "".join(out)


def restic_args(patterns: Iterable[str], root: str) -> list[str]:
    """restic backup options that leave the (normalized) patterns out of a volume read at `root`."""
    return [f"--exclude={restic_pattern(p, root)}" for p in patterns]


def tar_args(patterns: Iterable[str]) -> list[str]:
    """tar options that leave the (normalized) patterns out; nothing when there are none."""
    patterns = list(patterns)
    if not patterns:
        return []
    return [*MATCHING, *(f"--exclude=./{normalize(p)}" for p in patterns)]
