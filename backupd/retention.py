"""Retention policy, pure: given backups, a policy and `now`, which to keep and why.

Grandfather-father-son as restic and borg define it: walking succeeded
backups newest first, `keep_daily: 7` keeps the newest backup of each of the
7 most recent days that have one (likewise hourly, weekly (ISO week),
monthly, yearly), in the job's time zone. `keep_last: N` keeps the N newest;
`keep_within: 7d` keeps everything newer than now - 7d.

Safety rules on top, whatever the policy says:
- only succeeded backups count toward any keep rule;
- the newest succeeded backup is always kept;
- running backups are always kept;
- failed and partial backups are kept for `keep_failed` (default 7 days) so
  an operator can look at them, then deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Callable, Iterable
from zoneinfo import ZoneInfo

DEFAULT_KEEP_FAILED = timedelta(days=7)
UTC = ZoneInfo("UTC")


@dataclass(frozen=True)
class BackupRecord:
    id: str
    started_at: datetime  # aware
    status: str  # succeeded / partial / failed / running


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: timedelta | None = None
    keep_failed: timedelta | None = None

    @classmethod
    def from_config(cls, retention: object) -> "Policy":
        return cls(**{f: getattr(retention, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Decision:
    id: str
    started_at: datetime
    status: str
    keep: bool
    reasons: tuple[str, ...]


def _hour(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:00")


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _week(t: datetime) -> str:
    year, week, _ = t.isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: datetime) -> str:
    return t.strftime("%Y-%m")


def _year(t: datetime) -> str:
    return t.strftime("%Y")


PERIODS: tuple[tuple[str, str, Callable[[datetime], str]], ...] = (
    ("keep_hourly", "hourly", _hour),
    ("keep_daily", "daily", _day),
    ("keep_weekly", "weekly", _week),
    ("keep_monthly", "monthly", _month),
    ("keep_yearly", "yearly", _year),
)


def policy_problems(policy: Policy) -> list[str]:
    """Why a policy is unusable (the config loader turns these into errors)."""
    problems = []
    counts = {f: getattr(policy, f) for f in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly",
                                               "keep_monthly", "keep_yearly")}
    problems += [f"{f} must not be negative" for f, v in counts.items() if v is not None and v < 0]
    if not any(v for v in counts.values()) and not policy.keep_within:
        problems.append("this policy would keep nothing: set at least one keep_* rule")
    return problems


def decide(
    backups: Iterable[BackupRecord], policy: Policy, now: datetime, tz: tzinfo = UTC
) -> list[Decision]:
    """One decision per backup, newest first; independent of input order."""
    ordered = sorted(backups, key=lambda b: (b.started_at, b.id), reverse=True)
    reasons: dict[str, list[str]] = {b.id: [] for b in ordered}
    good = [b for b in ordered if b.status == "succeeded"]

    if good:
        reasons[good[0].id].append("newest succeeded")
    for i, b in enumerate(good[: policy.keep_last or 0]):
        reasons[b.id].append(f"last {i + 1}/{policy.keep_last}")
    for field, label, bucket in PERIODS:
        limit = getattr(policy, field) or 0
        seen: list[str] = []
        for b in good:
            if len(seen) >= limit:
                break
            period = bucket(b.started_at.astimezone(tz))
            if period not in seen:
                seen.append(period)
                reasons[b.id].append(f"{label} {period}")
    if policy.keep_within:
        for b in good:
            if b.started_at > now - policy.keep_within:
                reasons[b.id].append(f"within {_fmt(policy.keep_within)}")

    keep_failed = policy.keep_failed if policy.keep_failed is not None else DEFAULT_KEEP_FAILED
    for b in ordered:
        if b.status == "running":
            reasons[b.id].append("running")
        elif b.status in ("failed", "partial") and b.started_at > now - keep_failed:
            reasons[b.id].append(f"{b.status} within {_fmt(keep_failed)}")

    return [Decision(b.id, b.started_at, b.status, bool(reasons[b.id]), tuple(reasons[b.id]))
            for b in ordered]


def _fmt(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def summarize(decisions: list[Decision], tz: tzinfo = UTC) -> str:
    """The table `backupd prune` prints: one line per backup, newest first."""
    rows = [("ID", "STARTED", "STATUS", "ACTION", "WHY")]
    for d in decisions:
        rows.append((d.id, d.started_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"), d.status,
                     "keep" if d.keep else "delete", ", ".join(d.reasons) or "no rule keeps it"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths)), r[4]]) for r in rows)
