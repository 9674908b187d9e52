"""Retention policy: examples that read as the spec, and properties checked against
an independent, deliberately naive implementation of each rule."""

from __future__ import annotations

import random
from datetime import date, datetime, time, timedelta, timezone
from typing import Callable, Iterable
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd.retention import (
    DEFAULT_KEEP_FAILED,
    BackupRecord,
    Decision,
    Policy,
    decide,
    format_duration,
    parse_duration,
    policy_problems,
    summarize,
)

UTC = timezone.utc
T0 = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)  # "now" in most tests: a Sunday


def rec(i: int, when: datetime, status: str = "succeeded") -> BackupRecord:
    return BackupRecord(f"b{i:05d}", when, status)


def kept(decisions: Iterable[Decision]) -> set[str]:
    return {d.id for d in decisions if d.keep}


def by_id(decisions: Iterable[Decision]) -> dict[str, Decision]:
    return {d.id: d for d in decisions}


# ------------------------------------------------------------------ examples: keep_* rules


def test_keep_last_keeps_the_n_newest_succeeded():
    backups = [rec(i, T0 - timedelta(hours=i)) for i in range(5)]
    decisions = by_id(decide(backups, Policy(keep_last=2), T0))
    assert kept(decisions.values()) == {"b00000", "b00001"}
    assert decisions["b00001"].reasons == ("last 2/2",)


def test_keep_last_skips_failed_partial_and_running_backups():
    backups = [rec(0, T0 - timedelta(days=30), "running"), rec(1, T0 - timedelta(days=20), "failed"),
               rec(2, T0 - timedelta(days=21), "partial"), rec(3, T0 - timedelta(days=22)),
               rec(4, T0 - timedelta(days=23)), rec(5, T0 - timedelta(days=24))]
    decisions = by_id(decide(backups, Policy(keep_last=2), T0))
    assert kept(decisions.values()) == {"b00000", "b00003", "b00004"}
    assert decisions["b00004"].reasons == ("last 2/2",)


def test_keep_daily_keeps_newest_backup_of_each_day():
    backups = [rec(i, T0 - timedelta(hours=6 * i)) for i in range(12)]  # every 6 h, 3 days back
    decisions = by_id(decide(backups, Policy(keep_daily=2), T0))
    # 2026-11-22 04:00 (b0) and 2026-11-21 22:00 (b1) are the newest of their days
    assert kept(decisions.values()) == {"b00000", "b00001"}
    assert decisions["b00000"].reasons == ("newest succeeded", "daily 2026-11-22")
    assert decisions["b00001"].reasons == ("daily 2026-11-21",)


def test_keep_daily_counts_only_days_that_have_a_backup():
    days = [T0 - timedelta(days=d) for d in (0, 5, 40, 41)]  # long gaps between them
    backups = [rec(i, t) for i, t in enumerate(days)]
    assert kept(decide(backups, Policy(keep_daily=3), T0)) == {"b00000", "b00001", "b00002"}


def test_keep_hourly_keeps_newest_backup_of_each_hour():
    backups = [rec(i, T0 - timedelta(minutes=20 * i)) for i in range(9)]  # 04:00, 03:40, ... 01:20
    decisions = by_id(decide(backups, Policy(keep_hourly=3), T0))
    assert kept(decisions.values()) == {"b00000", "b00001", "b00004"}  # 04:00, 03:40, 02:40
    assert decisions["b00004"].reasons == ("hourly 2026-11-22 02:00",)


def test_keep_weekly_uses_iso_weeks_starting_monday():
    # Sun 2026-11-22 (W47), Mon 2026-11-16 (W47), Sun 2026-11-15 (W46), Mon 2026-11-09 (W46)
    backups = [rec(i, datetime.combine(d, time(3), UTC)) for i, d in enumerate(
        [date(2026, 11, 22), date(2026, 11, 16), date(2026, 11, 15), date(2026, 11, 9)])]
    decisions = by_id(decide(backups, Policy(keep_weekly=5), T0))
    assert kept(decisions.values()) == {"b00000", "b00002"}
    assert decisions["b00002"].reasons == ("weekly 2026-W46",)


def test_keep_weekly_labels_the_iso_year_around_new_year():
    # Wed 2025-12-31 belongs to ISO week 2026-W01; Sun 2025-12-28 to 2025-W52.
    backups = [rec(0, datetime(2025, 12, 31, 3, tzinfo=UTC)), rec(1, datetime(2025, 12, 28, 3, tzinfo=UTC))]
    decisions = by_id(decide(backups, Policy(keep_weekly=2), T0))
    assert "weekly 2026-W01" in decisions["b00000"].reasons
    assert decisions["b00001"].reasons == ("weekly 2025-W52",)


def test_keep_monthly_and_yearly_keep_newest_of_each_month_and_year():
    backups = [rec(0, datetime(2026, 3, 2, tzinfo=UTC)), rec(1, datetime(2026, 2, 27, tzinfo=UTC)),
               rec(2, datetime(2026, 2, 3, tzinfo=UTC)), rec(3, datetime(2025, 12, 30, tzinfo=UTC)),
               rec(4, datetime(2025, 6, 1, tzinfo=UTC)), rec(5, datetime(2024, 1, 1, tzinfo=UTC))]
    decisions = by_id(decide(backups, Policy(keep_monthly=3, keep_yearly=3), T0))
    assert kept(decisions.values()) == {"b00000", "b00001", "b00003", "b00005"}
    assert decisions["b00001"].reasons == ("monthly 2026-02",)
    assert decisions["b00003"].reasons == ("monthly 2025-12", "yearly 2025")
    assert decisions["b00005"].reasons == ("yearly 2024",)


def test_keep_within_keeps_succeeded_backups_newer_than_now_minus_the_window():
    backups = [rec(0, T0 - timedelta(hours=1)), rec(1, T0 - timedelta(days=2) + timedelta(seconds=1)),
               rec(2, T0 - timedelta(days=2)), rec(3, T0 - timedelta(hours=2), "failed")]
    decisions = by_id(decide(backups, Policy(keep_within=timedelta(days=2), keep_failed=timedelta(0)), T0))
    assert kept(decisions.values()) == {"b00000", "b00001"}  # the window is open at its old end
    assert decisions["b00001"].reasons == ("within 2d",)
    assert not decisions["b00003"].keep


def test_a_backup_kept_by_several_rules_lists_every_reason_in_a_fixed_order():
    backups = [rec(0, T0 - timedelta(minutes=5))]
    policy = Policy(keep_last=3, keep_hourly=1, keep_daily=1, keep_weekly=1, keep_monthly=1, keep_yearly=1,
                    keep_within=timedelta(hours=36))
    assert decide(backups, policy, T0)[0].reasons == (
        "newest succeeded", "last 1/3", "hourly 2026-11-22 03:00", "daily 2026-11-22", "weekly 2026-W47",
        "monthly 2026-11", "yearly 2026", "within 1d12h")


def test_zero_turns_a_rule_off():
    backups = [rec(i, T0 - timedelta(days=i)) for i in range(5)]
    policy = Policy(keep_last=0, keep_daily=0, keep_within=timedelta(0), keep_monthly=1)
    assert kept(decide(backups, policy, T0)) == {"b00000"}


# ------------------------------------------------------------------ examples: time zones


def test_periods_are_computed_in_the_job_timezone():
    # 23:30 UTC on the 21st is already the 22nd in Berlin: same day as 08:00 on the 22nd there.
    backups = [rec(0, datetime(2026, 11, 22, 7, 0, tzinfo=UTC)), rec(1, datetime(2026, 11, 21, 23, 30, tzinfo=UTC))]
    assert kept(decide(backups, Policy(keep_daily=2), T0, ZoneInfo("UTC"))) == {"b00000", "b00001"}
    assert kept(decide(backups, Policy(keep_daily=2), T0, ZoneInfo("Europe/Berlin"))) == {"b00000"}


def test_the_hour_repeated_when_clocks_go_back_counts_as_two_hours():
    ny = ZoneInfo("America/New_York")  # 2026-11-01 02:00 EDT -> 01:00 EST
    first = datetime(2026, 11, 1, 5, 40, tzinfo=UTC)  # 01:40 EDT
    second = datetime(2026, 11, 1, 6, 20, tzinfo=UTC)  # 01:20 EST, 40 minutes later
    decisions = by_id(decide([rec(0, second), rec(1, first)], Policy(keep_hourly=2), T0, ny))
    assert decisions["b00000"].reasons == ("newest succeeded", "hourly 2026-11-01 01:00 UTC-05:00")
    assert decisions["b00001"].reasons == ("hourly 2026-11-01 01:00 UTC-04:00",)


@pytest.mark.parametrize("zone, utc_day", [
    ("America/New_York", datetime(2026, 11, 1, tzinfo=UTC)),  # back 1 h at 02:00
    ("Pacific/Chatham", datetime(2026, 4, 4, tzinfo=UTC)),  # back 1 h at 03:45, offset +13:45 -> +12:45
    ("Australia/Lord_Howe", datetime(2026, 4, 4, tzinfo=UTC)),  # back 30 min at 02:00
])
def test_hourly_periods_stay_consistent_across_odd_clock_changes(zone, utc_day):
    tz = ZoneInfo(zone)
    backups = [rec(i, utc_day + timedelta(minutes=5 * i)) for i in range(12 * 48)]  # every 5 min, 2 days
    decisions = decide(backups, Policy(keep_hourly=1000), T0, tz)
    labels = [r for d in decisions for r in d.reasons if r.startswith("hourly ")]
    periods = {(b.started_at.astimezone(tz).strftime("%Y-%m-%d %H"), b.started_at.astimezone(tz).utcoffset())
               for b in backups}
    assert len(labels) == len(set(labels)) == len(periods)
    assert any(" UTC" in label for label in labels)  # the hours the clocks change carry their offset


def test_the_day_clocks_go_back_is_still_one_day():
    berlin = ZoneInfo("Europe/Berlin")  # 2026-10-25 has 25 hours there
    backups = [rec(i, datetime(2026, 10, 24, 22, tzinfo=UTC) + timedelta(hours=i)) for i in range(25)]
    assert kept(decide(backups, Policy(keep_daily=5), T0, berlin)) == {"b00024"}


# ------------------------------------------------------------------ examples: safety rules


def test_failed_and_partial_never_count_and_expire_after_keep_failed():
    backups = [rec(0, T0 - timedelta(days=1), "failed"), rec(1, T0 - timedelta(days=2), "partial"),
               rec(2, T0 - timedelta(days=10), "failed"), rec(3, T0 - timedelta(days=3))]
    decisions = by_id(decide(backups, Policy(keep_last=1), T0))
    assert decisions["b00000"].keep and decisions["b00000"].reasons == ("failed within 7d",)
    assert decisions["b00001"].reasons == ("partial within 7d",)
    assert not decisions["b00002"].keep and decisions["b00002"].reasons == ()
    assert decisions["b00003"].reasons == ("newest succeeded", "last 1/1")


def test_keep_failed_defaults_to_seven_days_and_can_be_changed():
    assert DEFAULT_KEEP_FAILED == timedelta(days=7)
    backups = [rec(0, T0 - timedelta(days=6, hours=23), "failed"), rec(1, T0 - timedelta(days=7), "failed")]
    assert kept(decide(backups, Policy(keep_last=1), T0)) == {"b00000"}
    assert kept(decide(backups, Policy(keep_last=1, keep_failed=timedelta(days=30)), T0)) == {"b00000", "b00001"}
    assert kept(decide(backups, Policy(keep_last=1, keep_failed=timedelta(0)), T0)) == set()


def test_newest_succeeded_is_kept_even_when_every_rule_has_moved_on():
    backups = [rec(0, T0 - timedelta(days=400)), rec(1, T0 - timedelta(days=500)), rec(2, T0, "failed")]
    decisions = decide(backups, Policy(keep_within=timedelta(days=7), keep_failed=timedelta(0)), T0)
    assert kept(decisions) == {"b00000"}
    assert by_id(decisions)["b00000"].reasons == ("newest succeeded",)


def test_running_backups_are_never_deleted():
    backups = [rec(0, T0 - timedelta(days=300), "running"), rec(1, T0)]
    decisions = by_id(decide(backups, Policy(keep_last=1, keep_failed=timedelta(0)), T0))
    assert kept(decisions.values()) == {"b00000", "b00001"}
    assert decisions["b00000"].reasons == ("running",)


def test_no_backups_means_no_decisions():
    assert decide([], Policy(keep_last=1), T0) == []


# ------------------------------------------------------------------ examples: order and bad input


def test_decisions_come_newest_first_with_ties_broken_by_id():
    backups = [rec(2, T0 - timedelta(days=1)), rec(12, T0), rec(21, T0)]
    random.Random(7).shuffle(backups)
    decisions = decide(backups, Policy(keep_last=1), T0)
    assert [d.id for d in decisions] == ["b00021", "b00012", "b00002"]
    assert kept(decisions) == {"b00021"}  # same second: the larger id counts as newer


@pytest.mark.parametrize("bad, message", [
    ([rec(0, datetime(2026, 1, 1))], "timezone-aware"),
    ([rec(0, T0), rec(0, T0 - timedelta(days=1))], "duplicate backup id 'b00000'"),
    ([rec(0, T0, "exploded")], "unknown status 'exploded'"),
])
def test_input_that_cannot_be_judged_safely_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        decide(bad, Policy(keep_last=1), T0)


def test_naive_now_and_negative_policies_are_refused():
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        decide([], Policy(keep_last=1), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="keep_last must not be negative"):
        decide([rec(0, T0)], Policy(keep_last=-2), T0)


# ------------------------------------------------------------------ policy problems


def test_policy_that_keeps_nothing_is_a_problem():
    assert len(policy_problems(Policy())) == 1
    assert "would keep nothing" in policy_problems(Policy())[0]
    assert "would keep nothing" in policy_problems(Policy(keep_last=0, keep_daily=0, keep_within=timedelta(0)))[0]
    assert "would keep nothing" in policy_problems(Policy(keep_failed=timedelta(days=3)))[0]


def test_any_one_positive_rule_makes_a_policy_usable():
    assert policy_problems(Policy(keep_within=timedelta(hours=1))) == []
    for field in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
        assert policy_problems(Policy(**{field: 1})) == []


def test_negative_values_are_problems_each_named():
    problems = policy_problems(Policy(keep_daily=-1, keep_weekly=4, keep_within=-timedelta(days=1),
                                      keep_failed=-timedelta(hours=2)))
    assert len(problems) == 3
    assert "keep_daily must not be negative (got -1)" in problems[0]
    assert problems[1] == "keep_within must not be negative (got -1d)"
    assert problems[2] == "keep_failed must not be negative (got -2h)"


def test_validate_raises_with_every_problem():
    Policy(keep_last=1).validate()
    with pytest.raises(ValueError, match="keep_last must not be negative.*would keep nothing"):
        Policy(keep_last=-1).validate()


def test_policy_from_config_copies_the_fields():
    class Retention:
        keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly = 1, None, 7, 4, 12, None
        keep_within, keep_failed, schedule = timedelta(days=1), None, "@daily"

    assert Policy.from_config(Retention()) == Policy(keep_last=1, keep_daily=7, keep_weekly=4, keep_monthly=12,
                                                     keep_within=timedelta(days=1))


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize("text, expected", [
    ("7d", timedelta(days=7)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
    ("2w", timedelta(weeks=2)), ("1y", timedelta(days=365)), ("1d12h", timedelta(days=1, hours=12)),
    ("90s", timedelta(seconds=90)), ("1y2w3d4h5m6s", timedelta(days=365 + 14 + 3, hours=4, minutes=5, seconds=6)),
    (" 0d ", timedelta(0)),
])
def test_parse_duration_reads_config_spellings(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("   ", "empty"), ("7", "cannot read '7'"), ("d", "cannot read 'd'"),
    ("7x", "unknown unit 'x'"), ("7days", "unknown unit 'days'"), ("12h1d", "largest to smallest"),
    ("1d1d", "largest to smallest"), ("-7d", "cannot read '-7d'"), ("1.5d", "cannot read"),
    ("7d 12h", "cannot read"), ("7D", "unknown unit 'D'"), ("99999999999999999y", "too large"),
])
def test_parse_duration_names_the_bad_text(text, why):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value) and why in str(info.value)


def test_parse_duration_wants_a_string():
    with pytest.raises(TypeError):
        parse_duration(7)  # type: ignore[arg-type]


@pytest.mark.parametrize("delta, text", [
    (timedelta(days=7), "7d"), (timedelta(hours=36), "1d12h"), (timedelta(seconds=90), "1m30s"),
    (timedelta(0), "0s"), (timedelta(days=365), "365d"), (timedelta(seconds=1.5), "1.5s"),
    (-timedelta(hours=2), "-2h"),
])
def test_format_duration_is_compact(delta, text):
    assert format_duration(delta) == text


@given(st.integers(min_value=0, max_value=10 * 365 * 86400).map(lambda s: timedelta(seconds=s)))
def test_format_duration_parses_back(delta):
    assert parse_duration(format_duration(delta)) == delta


# ------------------------------------------------------------------ summary


def test_summary_table_says_why():
    table = summarize(decide([rec(0, T0), rec(1, T0 - timedelta(days=1))], Policy(keep_last=1), T0))
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "STARTED", "(UTC)", "STATUS", "ACTION", "WHY"]
    assert lines[1].split(None, 5) == ["b00000", "2026-11-22", "04:00", "succeeded", "keep",
                                       "newest succeeded, last 1/1"]
    assert lines[2].split(None, 5) == ["b00001", "2026-11-21", "04:00", "succeeded", "delete", "no rule keeps it"]
    assert lines[2].count("  delete  ") == 1  # what the CLI integration test counts


def test_summary_shows_times_in_the_given_zone():
    table = summarize(decide([rec(0, T0)], Policy(keep_last=1), T0), ZoneInfo("Europe/Berlin"))
    assert "STARTED (Europe/Berlin)" in table and "2026-11-22 05:00" in table


def test_summary_of_nothing_is_just_the_header():
    assert summarize([]).splitlines() == ["ID  STARTED (UTC)  STATUS  ACTION  WHY"]


# ------------------------------------------------------------------ acceptance scenario


def test_a_year_of_daily_backups_with_gfs_policy_keeps_exactly_the_expected_days():
    """Acceptance: daily at 03:00 UTC from 2025-11-22 to 2026-11-21, keep 7 daily,
    4 weekly, 12 monthly, pruned at 2026-11-22 04:00 UTC."""
    first = date(2025, 11, 22)
    backups = [rec(i, datetime.combine(first + timedelta(days=i), time(3), UTC)) for i in range(365)]
    assert backups[-1].started_at.date() == date(2026, 11, 21)
    random.Random(1).shuffle(backups)
    decisions = decide(backups, Policy(keep_daily=7, keep_weekly=4, keep_monthly=12), T0)
    kept_days = {d.started_at.date() for d in decisions if d.keep}
    expected = {
        # 7 daily: Sun 2026-11-15 .. Sat 2026-11-21
        date(2026, 11, 21), date(2026, 11, 20), date(2026, 11, 19), date(2026, 11, 18),
        date(2026, 11, 17), date(2026, 11, 16), date(2026, 11, 15),
        # 4 weekly: newest of ISO weeks 47 (Sat 21st), 46 (Sun 15th), 45 (Sun 8th), 44 (Sun 1st)
        date(2026, 11, 8), date(2026, 11, 1),
        # 12 monthly: Nov 2026 (the 21st), then the last day of Oct 2026 .. Dec 2025
        date(2026, 10, 31), date(2026, 9, 30), date(2026, 8, 31), date(2026, 7, 31),
        date(2026, 6, 30), date(2026, 5, 31), date(2026, 4, 30), date(2026, 3, 31),
        date(2026, 2, 28), date(2026, 1, 31), date(2025, 12, 31),
    }
    assert len(expected) == 20
    assert kept_days == expected
    reasons = {d.started_at.date(): d.reasons for d in decisions}
    assert reasons[date(2026, 11, 21)] == ("newest succeeded", "daily 2026-11-21", "weekly 2026-W47",
                                           "monthly 2026-11")
    assert reasons[date(2026, 11, 15)] == ("daily 2026-11-15", "weekly 2026-W46")
    assert reasons[date(2026, 11, 1)] == ("weekly 2026-W44",)
    assert reasons[date(2025, 12, 31)] == ("monthly 2025-12",)
    assert reasons[date(2025, 11, 30)] == ()  # Nov 2025 would be the 13th month


# ------------------------------------------------------------------ properties

STATUSES = ["succeeded"] * 6 + ["failed", "partial", "running"]
DAYS = 3 * 365


@st.composite
def histories(draw: st.DrawFn) -> list[BackupRecord]:
    """Up to ~120 backups over three years; days are drawn so that many land on the same
    day, hour or even second (ties), and every status appears."""
    busy_days = draw(st.lists(st.integers(0, DAYS), min_size=1, max_size=6))
    day = st.one_of(st.sampled_from(busy_days), st.integers(0, DAYS))
    second = st.one_of(st.sampled_from([0, 3 * 3600, 3 * 3600 + 1800]), st.integers(0, 86399))
    items = draw(st.lists(st.tuples(day, second, st.sampled_from(STATUSES)), max_size=120))
    return [rec(i, T0 - timedelta(days=d, seconds=s), status) for i, (d, s, status) in enumerate(items)]


counts = st.one_of(st.none(), st.integers(min_value=0, max_value=12))
policies = st.builds(
    Policy, keep_last=counts, keep_hourly=counts, keep_daily=counts, keep_weekly=counts,
    keep_monthly=counts, keep_yearly=counts,
    keep_within=st.one_of(st.none(), st.integers(0, 60 * 24).map(lambda h: timedelta(hours=h))),
    keep_failed=st.one_of(st.none(), st.integers(0, 60).map(lambda d: timedelta(days=d))),
)
zones = st.sampled_from([ZoneInfo(z) for z in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata",
                                               "Pacific/Chatham")])


def naive_hour(t: datetime) -> datetime:
    """Wall-clock hour told apart by UTC offset, as the UTC time its wall-clock start stands for."""
    return t.replace(minute=0, second=0, microsecond=0, tzinfo=None) - t.utcoffset()


# rule -> (reason prefix, period key of a local time); keys sort in time order for the zones above
NAIVE_PERIODS: dict[str, tuple[str, Callable[[datetime], object]]] = {
    "keep_hourly": ("hourly ", naive_hour),
    "keep_daily": ("daily ", lambda t: (t.year, t.month, t.day)),
    "keep_weekly": ("weekly ", lambda t: tuple(t.isocalendar())[:2]),
    "keep_monthly": ("monthly ", lambda t: (t.year, t.month)),
    "keep_yearly": ("yearly ", lambda t: t.year),
}


def naive_rule_sets(backups: list[BackupRecord], policy: Policy, now: datetime, tz) -> dict[str, set[str]]:
    """Each rule straight from its definition, one at a time, sharing no code with the module."""
    good = [b for b in backups if b.status == "succeeded"]

    def newest(group: list[BackupRecord]) -> BackupRecord:
        return max(group, key=lambda b: (b.started_at, b.id))

    rules: dict[str, set[str]] = {"newest succeeded": {newest(good).id} if good else set()}
    rules["last "] = {b.id for b in sorted(good, key=lambda b: (b.started_at, b.id))[::-1][: policy.keep_last or 0]}
    for field, (prefix, key) in NAIVE_PERIODS.items():
        groups: dict[object, list[BackupRecord]] = {}
        for b in good:
            groups.setdefault(key(b.started_at.astimezone(tz)), []).append(b)
        recent = sorted(groups)[::-1][: getattr(policy, field) or 0]
        rules[prefix] = {newest(groups[p]).id for p in recent}
    window = policy.keep_within or timedelta(0)
    rules["within "] = {b.id for b in good if window and now - b.started_at < window}
    rules["running"] = {b.id for b in backups if b.status == "running"}
    failed_window = timedelta(days=7) if policy.keep_failed is None else policy.keep_failed
    rules["failed within "] = {b.id for b in backups if b.status == "failed" and now - b.started_at < failed_window}
    rules["partial within "] = {b.id for b in backups if b.status == "partial" and now - b.started_at < failed_window}
    return rules


@settings(max_examples=300, deadline=None)
@given(histories(), policies, zones)
def test_every_rule_keeps_exactly_what_its_definition_says(backups, policy, tz):
    decisions = decide(backups, policy, T0, tz)
    expected = naive_rule_sets(backups, policy, T0, tz)
    for prefix, ids in expected.items():
        actual = {d.id for d in decisions if any(r.startswith(prefix) for r in d.reasons)}
        assert actual == ids, prefix
    assert kept(decisions) == set().union(*expected.values())


@settings(max_examples=200, deadline=None)
@given(histories(), policies, zones)
def test_one_decision_per_backup_newest_first_and_keep_means_a_reason(backups, policy, tz):
    decisions = decide(backups, policy, T0, tz)
    assert sorted(d.id for d in decisions) == sorted(b.id for b in backups)
    order = [(d.started_at, d.id) for d in decisions]
    assert order == sorted(order, reverse=True)
    assert all(d.keep == bool(d.reasons) for d in decisions)


@settings(max_examples=200, deadline=None)
@given(histories(), policies, zones)
def test_newest_succeeded_is_always_kept_and_failures_never_count(backups, policy, tz):
    decisions = decide(backups, policy, T0, tz)
    good = [b for b in backups if b.status == "succeeded"]
    if good:
        newest = max(good, key=lambda b: (b.started_at, b.id))
        assert "newest succeeded" in by_id(decisions)[newest.id].reasons
    for d in decisions:
        if d.status == "running":
            assert d.reasons == ("running",)
        elif d.status in ("failed", "partial"):
            assert d.reasons in ((), (f"{d.status} within {format_duration(policy.failed_window)}",))


@settings(max_examples=200, deadline=None)
@given(histories(), policies, zones, st.randoms(use_true_random=False))
def test_result_does_not_depend_on_input_order(backups, policy, tz, rnd):
    shuffled = list(backups)
    rnd.shuffle(shuffled)
    assert decide(shuffled, policy, T0, tz) == decide(backups, policy, T0, tz)


@settings(max_examples=200, deadline=None)
@given(histories(), policies, zones)
def test_pruning_is_idempotent(backups, policy, tz):
    """Deciding again over the survivors (same now) deletes nothing more and gives the same reasons."""
    first = decide(backups, policy, T0, tz)
    survivors = [b for b in backups if b.id in kept(first)]
    second = decide(survivors, policy, T0, tz)
    assert all(d.keep for d in second)
    assert second == [d for d in first if d.keep]
