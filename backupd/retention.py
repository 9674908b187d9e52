"""Retention policy, pure: given backups, a policy and `now`, which to keep and why.

No I/O, no catalog, no Docker: `backupd.prune` feeds catalog rows in and acts
on the answer, so every rule here can be tested exhaustively on plain data.

Rules (grandfather-father-son, as restic and borg define them)
--------------------------------------------------------------
Only *succeeded* backups count toward the keep_* rules. Backups are ordered
newest first by `started_at`; equal times are ordered by `id` (the larger id
counts as newer), so the result never depends on input order.

- ``keep_last: N``   keeps the N newest succeeded backups.
- ``keep_hourly/daily/weekly/monthly/yearly: N`` walks succeeded backups
  newest first and keeps the newest backup of each period, for the N most
  recent distinct periods that *have* a backup (empty periods do not use up
  the count). Periods are calendar periods in the job's time zone ``tz``:
  hour, day, ISO week (ISO year + week number), month, calendar year. The
  rules are independent of each other (as restic does it; unlike borg, a
  period whose newest backup another rule already keeps still counts).
- ``keep_within: D`` keeps succeeded backups with ``started_at > now - D``.
- A count of 0 (or None), or a ``keep_within`` of 0 (or None), turns the rule off.

Safety rules on top, whatever the policy says:

- the newest succeeded backup is always kept;
- running backups are always kept (never delete work in progress);
- failed, partial and suspicious (flagged by the shrinkage guard, not yet
  accepted) backups are kept while ``started_at > now - keep_failed``
  (``DEFAULT_KEEP_FAILED``, 7 days, when None) so an operator can look at
  them, then deleted. They never count toward any keep_* rule.

Reasons
-------
Each `Decision` says which rules keep the backup; ``keep`` is True exactly
when ``reasons`` is non-empty. Reasons appear in this order:

=====================  ==================================================
``newest succeeded``   the newest succeeded backup (always kept)
``last 2/7``           2nd newest succeeded, policy keep_last 7
``hourly 2026-11-22 03:00``
                       newest of that hour (local to ``tz``); in the hour
                       repeated when clocks go back, the UTC offset is
                       added: ``hourly 2026-11-01 01:00 UTC-05:00``
``daily 2026-11-22``   newest of that day
``weekly 2026-W47``    newest of that ISO week
``monthly 2026-11``    newest of that month
``yearly 2026``        newest of that year
``within 7d``          newer than now - keep_within (see `format_duration`)
``running``            in progress
``failed within 7d``   failed (or ``partial within 7d``) and newer than now - keep_failed
=====================  ==================================================
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Callable, Iterable, NamedTuple, Sequence
from zoneinfo import ZoneInfo

from backupd.status import FAILED, PARTIAL, RUNNING, SUCCEEDED, SUSPICIOUS

from backupd.table import format_table

__all__ = [
    "DEFAULT_KEEP_FAILED",
    "STATUSES",
    "UTC",
    "BackupRecord",
    "Decision",
    "Policy",
    "decide",
    "format_duration",
    "parse_duration",
    "policy_problems",
    "summarize",
]

DEFAULT_KEEP_FAILED = timedelta(days=7)
UTC = ZoneInfo("UTC")

STATUSES = frozenset({SUCCEEDED, FAILED, PARTIAL, RUNNING, SUSPICIOUS})
UNTRUSTED = (FAILED, PARTIAL, SUSPICIOUS)  # kept for keep_failed, never counted as good

COUNT_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


class BackupRecord(NamedTuple):
    """What retention needs to know about one backup run, nothing more.

    Immutable as a named tuple: a frozen dataclass costs 4x as much to build,
    and `backupd prune` builds one per backup (100k and more).
    """

    id: str
    started_at: datetime  # timezone-aware
    status: str  # succeeded / failed / partial / running


@dataclass(frozen=True)
class Policy:
    """A job's retention settings; None or 0 turns a rule off."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: timedelta | None = None
    keep_failed: timedelta | None = None  # None: DEFAULT_KEEP_FAILED

    @classmethod
    def from_config(cls, retention: object) -> "Policy":
        """Build from any object with the same attribute names (the config model)."""
        return cls(**{f: getattr(retention, f) for f in cls.__dataclass_fields__})

    def validate(self) -> None:
        """Raise ValueError listing every problem (see `policy_problems`)."""
        problems = policy_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def failed_window(self) -> timedelta:
        """How long failed/partial runs are kept, with the default applied."""
        return DEFAULT_KEEP_FAILED if self.keep_failed is None else self.keep_failed


class Decision(NamedTuple):
    """Keep or delete one backup, and every rule that keeps it (a named tuple, as BackupRecord)."""

    id: str
    started_at: datetime
    status: str
    keep: bool
    reasons: tuple[str, ...]


# ------------------------------------------------------------------ policy checks


def policy_problems(policy: Policy) -> list[str]:
    """Why a policy is unusable, one message per problem (the config loader turns them into errors).

    A policy that keeps nothing is refused even though `decide` would still
    keep the newest succeeded backup: it is almost certainly a typo.
    """
    problems = _negative(policy)
    if not any((getattr(policy, f) or 0) > 0 for f in COUNT_FIELDS) and not _positive(policy.keep_within):
        problems.append("this policy would keep nothing: set at least one keep_* rule "
                        "(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within)")
    return problems


def _negative(policy: Policy) -> list[str]:
    """Negative values have no meaning (and a negative slice would silently keep the wrong ones)."""
    problems = []
    for name in COUNT_FIELDS:
        value = getattr(policy, name)
        if value is not None and value < 0:
            problems.append(f"{name} must not be negative (got {value}); use 0 or leave it unset to turn it off")
    for name in ("keep_within", "keep_failed"):
        value = getattr(policy, name)
        if value is not None and value < timedelta(0):
            problems.append(f"{name} must not be negative (got {format_duration(value)})")
    return problems


def _positive(delta: timedelta | None) -> bool:
    return delta is not None and delta > timedelta(0)


# ------------------------------------------------------------------ periods


def _hour(t: datetime) -> str:
    """The local wall-clock hour; in an hour the clocks change, the UTC offset is part of it.

    So the hour repeated when clocks go back is two periods (two real hours),
    each labelled with its offset, and a label never names two periods.
    """
    start = t.replace(minute=0, second=0, microsecond=0)
    label = start.strftime("%Y-%m-%d %H:00")
    end = start.replace(minute=59, second=59, microsecond=999999)
    if start.replace(fold=0).utcoffset() != end.replace(fold=1).utcoffset():
        label += " " + _offset(t)
    return label


def _offset(t: datetime) -> str:
    offset = t.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: datetime) -> str:
    return t.strftime("%Y-%m")


def _year(t: datetime) -> str:
    return f"{t.year:04d}"


# (policy field, reason label, period of a local time); also the order reasons appear in.
PERIODS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", _hour),
    ("keep_daily", "daily", _day),
    ("keep_weekly", "weekly", _week),
    ("keep_monthly", "monthly", _month),
    ("keep_yearly", "yearly", _year),
)


# ------------------------------------------------------------------ the decision


def decide(
    backups: Iterable[BackupRecord], policy: Policy, now: datetime, tz: tzinfo = UTC
) -> list[Decision]:
    """One decision per backup, newest first; the same whatever the input order.

    Raises ValueError on input the rules cannot judge safely: naive datetimes,
    duplicate ids, unknown statuses, negative policy values.
    """
    _check_aware(now, "now")
    negative = _negative(policy)
    if negative:
        raise ValueError("; ".join(negative))

    items = list(backups)
    _check_backups(items)
    ordered = sorted(items, key=lambda b: (b.started_at, b.id), reverse=True)
    reasons: defaultdict[str, list[str]] = defaultdict(list)  # only kept backups get an entry
    good = [b for b in ordered if b.status == SUCCEEDED]

    if good:
        reasons[good[0].id].append("newest succeeded")
    keep_last = policy.keep_last or 0
    for rank, b in enumerate(good[:keep_last], start=1):
        reasons[b.id].append(f"last {rank}/{keep_last}")
    for field, label, period_of in PERIODS:
        limit = getattr(policy, field) or 0
        seen: set[str] = set()
        for b in good:
            if len(seen) >= limit:
                break
            period = period_of(b.started_at.astimezone(tz))
            if period not in seen:  # newest first, so the first one met is the period's newest
                seen.add(period)
                reasons[b.id].append(f"{label} {period}")
    within = policy.keep_within
    if within is not None and within > timedelta(0):
        cutoff = now - within
        for b in good:
            if b.started_at > cutoff:
                reasons[b.id].append(f"within {format_duration(within)}")

    failed_cutoff = now - policy.failed_window
    for b in ordered:
        if b.status == RUNNING:
            reasons[b.id].append("running")
        elif b.status in UNTRUSTED and b.started_at > failed_cutoff:
            reasons[b.id].append(f"{b.status} within {format_duration(policy.failed_window)}")

    found = reasons.get
    return [Decision(b.id, b.started_at, b.status, True, tuple(r)) if (r := found(b.id))
            else Decision(b.id, b.started_at, b.status, False, ()) for b in ordered]


def _check_backups(backups: Sequence[BackupRecord]) -> None:
    """Refuse input where a wrong guess could delete the wrong backup."""
    # Whole-list checks first (3x faster at 100k); only bad input needs the loop that names the culprit.
    if (len({b.id for b in backups}) == len(backups) and {b.status for b in backups} <= STATUSES
            and all(b.started_at.utcoffset() is not None for b in backups)):
        return
    ids: set[str] = set()
    for b in backups:
        if b.id in ids:
            raise ValueError(f"duplicate backup id {b.id!r}")
        ids.add(b.id)
        if b.status not in STATUSES:
            raise ValueError(f"backup {b.id!r} has unknown status {b.status!r} (expected one of {sorted(STATUSES)})")
        _check_aware(b.started_at, f"backup {b.id!r} started_at")


def _check_aware(t: datetime, what: str) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {t.isoformat()})")


# ------------------------------------------------------------------ durations

_UNITS: dict[str, timedelta] = {
    "y": timedelta(days=365),
    "w": timedelta(weeks=1),
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "m": timedelta(minutes=1),
    "s": timedelta(seconds=1),
}
_PART = re.compile(r"(\d+)([a-zA-Z]+)")
_HINT = "use a number and a unit (y=365d, w, d, h, m, s), largest unit first, e.g. 7d, 12h, 30m, 2w, 1y, 1d12h"


def parse_duration(text: str) -> timedelta:
    """'7d', '12h', '30m', '2w', '1y' (365 days), '1d12h': how config spells time windows.

    Units must go from largest to smallest, each at most once, so a typo like
    '12h1d' or '1d1d' is an error instead of a surprise.
    """
    if not isinstance(text, str):
        raise TypeError(f"duration must be a string like '7d', got {type(text).__name__} {text!r}")
    s = text.strip()
    if not s:
        raise ValueError(f"invalid duration {text!r}: empty; {_HINT}")
    total = timedelta(0)
    pos = 0
    last_rank = -1
    order = list(_UNITS)
    while pos < len(s):
        match = _PART.match(s, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: cannot read {s[pos:]!r}; {_HINT}")
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(f"invalid duration {text!r}: unknown unit {unit!r}; {_HINT}")
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(f"invalid duration {text!r}: units must go from largest to smallest, "
                             f"each at most once; {_HINT}")
        last_rank = rank
        try:
            total += int(number) * _UNITS[unit]
        except OverflowError:
            raise ValueError(f"invalid duration {text!r}: too large") from None
        pos = match.end()
    return total


def format_duration(delta: timedelta) -> str:
    """Compact, parseable form for reasons: 7d, 36h -> '1d12h', 90s -> '1m30s', 0 -> '0s'."""
    if delta < timedelta(0):
        return "-" + format_duration(-delta)
    seconds = delta.days * 86400 + delta.seconds
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if delta.microseconds:  # never from config, but never print something wrong either
        parts.append(f"{seconds}.{delta.microseconds:06d}".rstrip("0") + "s")
    elif seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


# ------------------------------------------------------------------ report


def summarize(decisions: Sequence[Decision], tz: tzinfo = UTC) -> str:
    """The table `backupd prune` (and --dry-run) prints: one line per backup, in the order given.

    Columns: ID, STARTED (in `tz`), STATUS, ACTION (keep/delete), WHY (the
    reasons, or "no rule keeps it").
    """
    header = ("ID", f"STARTED ({_zone_name(tz)})", "STATUS", "ACTION", "WHY")
    rows = [header]
    rows += [(d.id, d.started_at.astimezone(tz).isoformat(" ", "minutes")[:16], d.status,
              "keep" if d.keep else "delete", ", ".join(d.reasons) or "no rule keeps it")
             for d in decisions]
    return format_table(rows)


def _zone_name(tz: tzinfo) -> str:
    key = getattr(tz, "key", None)
    return key if isinstance(key, str) else (tz.tzname(None) or str(tz))
