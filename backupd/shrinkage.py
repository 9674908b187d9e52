"""The shrinkage guard: a backup that suddenly got much smaller is not trusted on sight.

Seven nights of near-empty backups (an application that wiped its volume, a mount that went
missing) must not let retention delete the week of good ones before them. So a backup more
than `share` smaller than the median of the job's last few trusted successes is marked
suspicious: logged, notified, shown by `list` and /healthz, and retention deletes nothing from
the job while it is the newest, until an operator runs `backupd accept` or a later backup is
normal again. Size and file count are each judged: an application that replaced its files with
empty ones, or a cache that grew while the data vanished, changes one and not the other.
"""

from __future__ import annotations

from statistics import median

from backupd.errors import RefusedError
from backupd.stream import human_bytes

WINDOW = 5  # how many earlier successes make the median
MINIMUM_HISTORY = 3  # fewer than this: nothing to compare with yet


class SuspiciousShrinkError(RefusedError):
    """Retention refused: the job's newest backup is suspiciously small."""


def _below(value: int, earlier: list[int], share: float) -> float | None:
    """The median of `earlier` when `value` is more than `share` below it, else None."""
    if share <= 0 or len(earlier) < MINIMUM_HISTORY:
        return None
    typical = median(earlier)
    if typical <= 0 or value >= typical * (1 - share):
        return None
    return typical


def judge(size: int, earlier: list[int], share: float) -> str | None:
    """Why `size` is suspicious next to the `earlier` sizes, or None if it is not."""
    typical = _below(size, earlier, share)
    if typical is None:
        return None
    return (f"size {human_bytes(size)} is {100 * (1 - size / typical):.0f}% below the median "
            f"{human_bytes(int(typical))} of the last {len(earlier)} successful backups "
            f"(more than {share:.0%} smaller is suspicious)")


def judge_files(count: int, earlier: list[int], share: float) -> str | None:
    """Why a file count of `count` is suspicious next to the `earlier` counts, or None."""
    typical = _below(count, earlier, share)
    if typical is None:
        return None
    return (f"file count {count} is {100 * (1 - count / typical):.0f}% below the median "
            f"{typical:g} of the last {len(earlier)} successful backups "
            f"(more than {share:.0%} fewer is suspicious)")
