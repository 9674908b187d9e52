"""Retention policy: examples that read as the spec, and properties checked against
an independent, deliberately naive implementation of each rule."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.retention import BackupRecord, Policy, decide, policy_problems, summarize

UTC = timezone.utc
T0 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


def rec(i: int, when: datetime, status: str = "succeeded") -> BackupRecord:
    return BackupRecord(f"b{i:05d}", when, status)


def kept(decisions) -> set[str]:
    return {d.id for d in decisions if d.keep}


# ------------------------------------------------------------------ examples


def test_keep_last_keeps_the_n_newest_succeeded():
    backups = [rec(i, T0 - timedelta(hours=i)) for i in range(5)]
    assert kept(decide(backups, Policy(keep_last=2), T0)) == {"b00000", "b00001"}


def test_keep_daily_keeps_newest_backup_of_each_day():
    backups = [rec(i, T0 - timedelta(hours=6 * i)) for i in range(12)]  # 4 a day, 3 days
    decisions = decide(backups, Policy(keep_daily=2), T0)
    # 2026-11-22 04:00 (b0), 2026-11-21 22:00 (b1) are the newest of their days
    assert kept(decisions) == {"b00000", "b00001"}
    assert "daily 2026-11-21" in next(d for d in decisions if d.id == "b00001").reasons


def test_periods_are_computed_in_the_job_timezone():
    # 23:30 UTC on the 21st is already the 22nd in Berlin: same day as 08:00 on the 22nd there.
    backups = [rec(0, datetime(2026, 11, 22, 7, 0, tzinfo=UTC)), rec(1, datetime(2026, 11, 21, 23, 30, tzinfo=UTC))]
    assert kept(decide(backups, Policy(keep_daily=2), T0, ZoneInfo("UTC"))) == {"b00000", "b00001"}
    assert kept(decide(backups, Policy(keep_daily=2), T0, ZoneInfo("Europe/Berlin"))) == {"b00000"}


def test_failed_and_partial_never_count_and_expire_after_keep_failed():
    backups = [rec(0, T0 - timedelta(days=1), "failed"), rec(1, T0 - timedelta(days=2), "partial"),
               rec(2, T0 - timedelta(days=10), "failed"), rec(3, T0 - timedelta(days=3))]
    decisions = {d.id: d for d in decide(backups, Policy(keep_last=1), T0)}
    assert decisions["b00000"].keep and decisions["b00000"].reasons == ("failed within 7d",)
    assert decisions["b00001"].keep
    assert not decisions["b00002"].keep
    assert decisions["b00003"].keep and "last 1/1" in decisions["b00003"].reasons


def test_newest_succeeded_is_kept_even_when_every_rule_has_moved_on():
    backups = [rec(0, T0 - timedelta(days=400)), rec(1, T0 - timedelta(days=500))]
    decisions = decide(backups, Policy(keep_within=timedelta(days=7)), T0)
    assert kept(decisions) == {"b00000"}
    assert decisions[0].reasons == ("newest succeeded",)


def test_running_backups_are_never_deleted():
    backups = [rec(0, T0 - timedelta(days=30), "running"), rec(1, T0)]
    assert kept(decide(backups, Policy(keep_last=1), T0)) == {"b00000", "b00001"}


def test_policy_that_keeps_nothing_is_a_problem():
    assert policy_problems(Policy()) == ["this policy would keep nothing: set at least one keep_* rule"]
    assert policy_problems(Policy(keep_last=0, keep_daily=0)) != []
    assert policy_problems(Policy(keep_within=timedelta(hours=1))) == []


def test_summary_table_says_why():
    table = summarize(decide([rec(0, T0), rec(1, T0 - timedelta(days=1))], Policy(keep_last=1), T0))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["ID", "STARTED", "STATUS", "ACTION"]
    assert "keep" in lines[1] and "newest succeeded, last 1/1" in lines[1]
    assert "delete" in lines[2] and "no rule keeps it" in lines[2]


def test_a_year_of_daily_backups_with_gfs_policy_keeps_exactly_the_expected_days():
    """Acceptance: daily at 03:00 UTC from 2025-11-22 to 2026-11-21, keep 7 daily,
    4 weekly, 12 monthly, pruned at 2026-11-22 04:00 UTC."""
    first = date(2025, 11, 22)
    backups = [rec(i, datetime.combine(first + timedelta(days=i), datetime.min.time(), UTC) + timedelta(hours=3))
               for i in range(365)]
    decisions = decide(backups, Policy(keep_daily=7, keep_weekly=4, keep_monthly=12), T0)
    kept_days = sorted(d.started_at.date().isoformat() for d in decisions if d.keep)
    expected = sorted({
        # 7 daily: the last seven days
        "2026-11-21", "2026-11-20", "2026-11-19", "2026-11-18", "2026-11-17", "2026-11-16", "2026-11-15",
        # 4 weekly: newest of ISO weeks 47 (Sat 21st), 46 (Sun 15th), 45 (Sun 8th), 44 (Sun 1st)
        "2026-11-08", "2026-11-01",
        # 12 monthly: newest of Nov 2026 (21st) and the last day of Oct 2026 .. Dec 2025
        "2026-10-31", "2026-09-30", "2026-08-31", "2026-07-31", "2026-06-30", "2026-05-31",
        "2026-04-30", "2026-03-31", "2026-02-28", "2026-01-31", "2025-12-31",
    })
    assert kept_days == expected
    assert len(expected) == 20


# ------------------------------------------------------------------ properties

statuses = st.sampled_from(["succeeded"] * 6 + ["failed", "partial", "running"])
histories = st.lists(
    st.tuples(st.integers(min_value=0, max_value=3 * 365 * 24 * 60), statuses), max_size=120,
).map(lambda items: [rec(i, T0 - timedelta(minutes=m), s) for i, (m, s) in enumerate(items)])
counts = st.one_of(st.none(), st.integers(min_value=0, max_value=10))
policies = st.builds(
    Policy, keep_last=counts, keep_hourly=counts, keep_daily=counts, keep_weekly=counts,
    keep_monthly=counts, keep_yearly=counts,
    keep_within=st.one_of(st.none(), st.integers(1, 24 * 60).map(lambda h: timedelta(hours=h))),
    keep_failed=st.one_of(st.none(), st.integers(0, 30).map(lambda d: timedelta(days=d))),
)
zones = st.sampled_from([ZoneInfo("UTC"), ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")])


def naive_kept(backups, policy: Policy, now, tz) -> set[str]:
    """Each rule straight from its definition, one at a time, no shared code."""
    good = sorted((b for b in backups if b.status == "succeeded"), key=lambda b: (b.started_at, b.id))[::-1]
    keep: set[str] = set()
    if good:
        keep.add(good[0].id)
    keep |= {b.id for b in good[: policy.keep_last or 0]}
    formats = {"keep_hourly": lambda t: (t.year, t.month, t.day, t.hour),
               "keep_daily": lambda t: (t.year, t.month, t.day),
               "keep_weekly": lambda t: tuple(t.isocalendar())[:2],
               "keep_monthly": lambda t: (t.year, t.month), "keep_yearly": lambda t: (t.year,)}
    for field, key in formats.items():
        n = getattr(policy, field) or 0
        newest_per_period: dict = {}
        for b in good:
            newest_per_period.setdefault(key(b.started_at.astimezone(tz)), b)
        periods = sorted(newest_per_period, reverse=True)[:n]
        keep |= {newest_per_period[p].id for p in periods}
    if policy.keep_within:
        keep |= {b.id for b in good if b.started_at > now - policy.keep_within}
    window = policy.keep_failed if policy.keep_failed is not None else timedelta(days=7)
    keep |= {b.id for b in backups if b.status == "running"}
    keep |= {b.id for b in backups if b.status in ("failed", "partial") and b.started_at > now - window}
    return keep


@settings(max_examples=300, deadline=None)
@given(histories, policies, zones)
def test_every_rule_keeps_exactly_what_its_definition_says(backups, policy, tz):
    assert kept(decide(backups, policy, T0, tz)) == naive_kept(backups, policy, T0, tz)


@settings(max_examples=200, deadline=None)
@given(histories, policies, zones)
def test_newest_succeeded_is_always_kept_and_failures_never_count(backups, policy, tz):
    decisions = decide(backups, policy, T0, tz)
    good = [b for b in backups if b.status == "succeeded"]
    if good:
        newest = max(good, key=lambda b: (b.started_at, b.id))
        assert newest.id in kept(decisions)
    for d in decisions:
        if d.status != "succeeded":
            assert all(r.startswith(d.status) or r == "running" for r in d.reasons)


@settings(max_examples=200, deadline=None)
@given(histories, policies, zones, st.randoms(use_true_random=False))
def test_result_does_not_depend_on_input_order(backups, policy, tz, rnd):
    shuffled = list(backups)
    rnd.shuffle(shuffled)
    assert decide(backups, policy, T0, tz) == decide(shuffled, policy, T0, tz)


@settings(max_examples=200, deadline=None)
@given(histories, policies, zones)
def test_pruning_twice_deletes_nothing_the_second_time(backups, policy, tz):
    first = decide(backups, policy, T0, tz)
    survivors = [b for b in backups if b.id in kept(first)]
    second = decide(survivors, policy, T0, tz)
    assert all(d.keep for d in second)


def test_random_order_sanity():
    backups = [rec(i, T0 - timedelta(hours=i)) for i in range(50)]
    random.shuffle(backups)
    assert [d.id for d in decide(backups, Policy(keep_last=3), T0)][:3] == ["b00000", "b00001", "b00002"]
