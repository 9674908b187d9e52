"""Scheduling decisions with a controllable clock: APScheduler is driven step by step
(`_process_jobs`) with its notion of "now" replaced, so no test waits for a real minute."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import apscheduler.executors.base
import apscheduler.schedulers.base
import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.executors.debug import DebugExecutor
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.base import BaseScheduler

from backupd import scheduler as sched_mod
from backupd.catalog import Catalog
from backupd.config import parse_config
from backupd.daemon import Signals, reload_config, run_daemon
from backupd.docker_host import VolumeSource
from backupd.errors import ConfigError
from backupd.run import Plan, RunResult
from backupd.scheduler import (
    BACKUP,
    PRUNE,
    VERIFY,
    Entry,
    ResourceLocks,
    Sidecar,
    Stopping,
    cron_trigger,
    entries_of,
    is_overdue,
    next_runs,
    resources_of,
)

UTC = timezone.utc
T0 = datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC)  # a Monday


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Replace the datetime APScheduler reads "now" from (scheduler loop and executor)."""
    c = Clock(T0)

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return c.now.astimezone(tz) if tz else c.now

    monkeypatch.setattr(apscheduler.schedulers.base, "datetime", FakeDatetime)
    monkeypatch.setattr(apscheduler.executors.base, "datetime", FakeDatetime)
    return c


class ManualScheduler(BaseScheduler):
    """A scheduler with no thread of its own: the test calls _process_jobs() when it likes."""

    def wakeup(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)

    def tick(self) -> None:
        self._process_jobs()


def config_of(jobs: dict[str, Any], **extra: Any) -> Any:
    return parse_config({"jobs": jobs, **extra})


def make_sidecar(config: Any, clock: Clock, tmp_path: Path, threaded: bool = False,
                 **kwargs: Any) -> tuple[Sidecar, list[tuple[str, str]]]:
    executor = ThreadPoolExecutor(4) if threaded else DebugExecutor()
    scheduler = ManualScheduler(timezone=UTC, executors={"default": executor})
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    sidecar = Sidecar(config, catalog, scheduler=scheduler, clock=clock, verify=None, **kwargs)
    calls: list[tuple[str, str]] = []
    for action in (BACKUP, PRUNE, VERIFY):
        sidecar.actions[action] = lambda cfg, job, logger, action=action: calls.append((action, job))
    return sidecar, calls


def at(clock: Clock, sidecar: Sidecar, when: datetime) -> None:
    clock.now = when
    sidecar.scheduler.tick()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- what gets scheduled


def test_every_job_schedule_retention_schedule_and_verify_schedule_becomes_an_entry() -> None:
    config = config_of({
        "a": {"schedule": "0 3 * * *", "volumes": ["v"], "timezone": "Europe/Paris", "jitter": "2m",
              "retention": {"keep_last": 3, "schedule": "30 4 * * *"}, "verify_schedule": "0 5 * * 0"},
        "manual": {"volumes": ["w"]},
    })
    entries = {e.id: e for e in entries_of(config)}
    assert set(entries) == {"backup:a", "prune:a", "verify:a"}
    assert entries["backup:a"] == Entry(BACKUP, "a", "0 3 * * *", "Europe/Paris", 120.0)


def test_an_invalid_retention_schedule_is_a_config_error_naming_its_key() -> None:
    config = config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"],
                              "retention": {"keep_last": 3, "schedule": "every day"}}})
    with pytest.raises(ConfigError, match=r"jobs\.a\.retention\.schedule: schedule 'every day'"):
        entries_of(config)


def test_cron_weekday_zero_means_sunday_not_apschedulers_monday() -> None:
    trigger = cron_trigger(Entry(BACKUP, "a", "0 3 * * 0", "UTC"))
    assert trigger.get_next_fire_time(None, T0) == datetime(2024, 1, 7, 3, 0, tzinfo=UTC)
    weekdays = cron_trigger(Entry(BACKUP, "a", "0 3 * * 1-5", "UTC"))
    assert weekdays.get_next_fire_time(None, datetime(2024, 1, 6, 4, tzinfo=UTC)) == \
        datetime(2024, 1, 8, 3, 0, tzinfo=UTC)


def test_schedules_follow_the_jobs_timezone() -> None:
    config = config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"], "timezone": "America/New_York"}})
    [(entry, when)] = next_runs(config, T0)
    assert when == datetime(2024, 1, 1, 8, 0, tzinfo=UTC)


def test_next_runs_are_logged_at_start(clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}), clock, tmp_path)
    caplog.set_level("INFO")
    sidecar.start()
    line = next(r for r in caplog.records if "next runs at" in r.getMessage())
    assert "2024-01-01T03:00:00+00:00" in line.getMessage() and line.job == "a"


# ---------------------------------------------------------------- when runs happen


def test_a_job_runs_at_its_cron_time_and_not_before(clock: Clock, tmp_path: Path) -> None:
    sidecar, calls = make_sidecar(config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}), clock, tmp_path)
    sidecar.start()
    at(clock, sidecar, datetime(2024, 1, 1, 2, 59, 59, tzinfo=UTC))
    assert calls == []
    at(clock, sidecar, datetime(2024, 1, 1, 3, 0, 0, tzinfo=UTC))
    assert calls == [(BACKUP, "a")]
    assert sidecar.next_run_times()["backup:a"] == datetime(2024, 1, 2, 3, 0, tzinfo=UTC)


def test_runs_missed_within_misfire_grace_coalesce_into_one_run(clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"schedule": "*/10 * * * *", "volumes": ["v"]}}, scheduler={"misfire_grace": "1h"})
    sidecar, calls = make_sidecar(config, clock, tmp_path)
    sidecar.start()
    at(clock, sidecar, datetime(2024, 1, 1, 0, 35, tzinfo=UTC))  # 00:10, 00:20, 00:30 all missed
    assert calls == [(BACKUP, "a")]
    assert sidecar.next_run_times()["backup:a"] == datetime(2024, 1, 1, 0, 40, tzinfo=UTC)


def test_a_run_missed_by_more_than_misfire_grace_is_skipped_and_logged(
        clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}, scheduler={"misfire_grace": "5m"})
    sidecar, calls = make_sidecar(config, clock, tmp_path)
    sidecar.start()
    at(clock, sidecar, datetime(2024, 1, 1, 3, 10, tzinfo=UTC))
    assert calls == []
    assert sidecar.skipped == [("backup:a", EVENT_JOB_MISSED)]
    assert any("skipped: missed by more than" in r.getMessage() for r in caplog.records)
    assert sidecar.next_run_times()["backup:a"] == datetime(2024, 1, 2, 3, 0, tzinfo=UTC)


def test_a_job_never_overlaps_itself(clock: Clock, tmp_path: Path) -> None:
    sidecar, calls = make_sidecar(config_of({"a": {"schedule": "* * * * *", "volumes": ["v"]}}),
                                  clock, tmp_path, threaded=True)
    entered, release = threading.Event(), threading.Event()

    def slow(cfg: Any, job: str, logger: Any) -> None:
        calls.append((BACKUP, job))
        entered.set()
        release.wait(10)

    sidecar.actions[BACKUP] = slow
    sidecar.start()
    at(clock, sidecar, datetime(2024, 1, 1, 0, 1, tzinfo=UTC))
    assert entered.wait(5)
    at(clock, sidecar, datetime(2024, 1, 1, 0, 2, tzinfo=UTC))  # still running: must not start again
    release.set()
    sidecar.scheduler.shutdown(wait=True)
    assert calls == [(BACKUP, "a")]
    assert ("backup:a", EVENT_JOB_MAX_INSTANCES) in sidecar.skipped


# ---------------------------------------------------------------- reload


def test_reload_adds_removes_and_reschedules_entries_and_keeps_unchanged_ones(clock: Clock, tmp_path: Path) -> None:
    old = config_of({"keep": {"schedule": "0 3 * * *", "volumes": ["v"]},
                     "change": {"schedule": "0 4 * * *", "volumes": ["v"]},
                     "gone": {"schedule": "0 5 * * *", "volumes": ["v"]}})
    sidecar, calls = make_sidecar(old, clock, tmp_path)
    sidecar.start()
    clock.now = datetime(2024, 1, 1, 1, 0, tzinfo=UTC)
    sidecar.reload(config_of({"keep": {"schedule": "0 3 * * *", "volumes": ["v"]},
                              "change": {"schedule": "30 4 * * *", "volumes": ["v"]},
                              "new": {"schedule": "0 6 * * *", "volumes": ["v"]}}))
    assert sidecar.next_run_times() == {
        "backup:keep": datetime(2024, 1, 1, 3, 0, tzinfo=UTC),
        "backup:change": datetime(2024, 1, 1, 4, 30, tzinfo=UTC),
        "backup:new": datetime(2024, 1, 1, 6, 0, tzinfo=UTC),
    }
    at(clock, sidecar, datetime(2024, 1, 1, 5, 0, tzinfo=UTC))
    assert (BACKUP, "gone") not in calls


def test_reload_changes_the_misfire_grace_of_existing_entries(clock: Clock, tmp_path: Path) -> None:
    job = {"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}
    sidecar, _ = make_sidecar(config_of(job, scheduler={"misfire_grace": "1h"}), clock, tmp_path)
    sidecar.start()
    sidecar.reload(config_of(job, scheduler={"misfire_grace": "2m"}))
    assert sidecar.scheduler.get_job("backup:a").misfire_grace_time == 120


def test_a_reload_with_an_invalid_config_is_refused_and_the_old_one_kept(
        clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"]}})
    sidecar, _ = make_sidecar(old, clock, tmp_path)
    sidecar.start()
    bad = tmp_path / "bad.yml"
    bad.write_text("jobs:\n  a:\n    schedule: '0 3 * *'\n    volumes: [v]\n")
    assert reload_config(sidecar, str(bad)) is False
    bad_retention = config_of({"a": {"schedule": "0 3 * * *", "volumes": ["v"],
                                     "retention": {"keep_last": 1, "schedule": "nope"}}})
    assert reload_config(sidecar, "unused", load=lambda path: bad_retention) is False
    assert sidecar.config is old
    assert [e.id for e in sidecar.entries()] == ["backup:a"]
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 2 and "must have 5 fields" in refused[0]


def test_a_reload_does_not_change_the_config_of_a_run_already_going(clock: Clock, tmp_path: Path) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"schedule": "* * * * *", "volumes": ["v"]}}), clock, tmp_path)
    seen: list[Any] = []

    def action(cfg: Any, job: str, logger: Any) -> None:
        sidecar.reload(config_of({"a": {"schedule": "0 3 * * *", "volumes": ["w"]}}))
        seen.append(cfg)

    sidecar.actions[BACKUP] = action
    old = sidecar.config
    sidecar.start()
    at(clock, sidecar, datetime(2024, 1, 1, 0, 1, tzinfo=UTC))
    assert seen == [old] and sidecar.config is not old


# ---------------------------------------------------------------- shared resources


def test_resources_of_a_job_are_the_job_its_volumes_and_its_named_containers() -> None:
    config = config_of({"a": {"volumes": ["v"], "stop_containers": ["app", {"label": "x=y"}],
                              "databases": [{"name": "db", "type": "postgres", "container": "pg"}],
                              "hooks": {"before": [{"command": "true", "container": "web"}]}}})
    volumes = [VolumeSource("v", "volume", "v", "w"), VolumeSource("p", "bind", "/srv/p", "w")]
    assert resources_of("a", config.jobs["a"], volumes) == [
        "bind:/srv/p", "container:app", "container:pg", "container:web", "job:a", "volume:v"]


def test_opposite_lock_orders_never_deadlock() -> None:
    locks, stop = ResourceLocks(poll=0.01), threading.Event()
    done: list[int] = []

    def worker(names: list[str], n: int) -> None:
        for _ in range(200):
            with locks.hold(names, stop):
                pass
        done.append(n)

    threads = [threading.Thread(target=worker, args=(["volume:b", "volume:a"], 1)),
               threading.Thread(target=worker, args=(["volume:a", "volume:b"], 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(done) == [1, 2] and locks.held() == []


def test_a_run_waiting_for_a_busy_resource_gives_up_when_backupd_stops() -> None:
    locks, stop = ResourceLocks(poll=0.01), threading.Event()
    with locks.hold(["volume:v"], stop):
        stop.set()
        with pytest.raises(Stopping, match="volume:v"):
            with locks.hold(["job:b", "volume:v"], stop):
                pass
    assert locks.held() == []


def fake_backup_engine(monkeypatch: pytest.MonkeyPatch, volumes_of: dict[str, list[str]], hold: float,
                       status: str = "succeeded") -> dict[str, Any]:
    """make_plan/run_backup stand-ins that record which volumes are being copied at once."""
    state: dict[str, Any] = {"active": set(), "overlaps": [], "ran": [], "lock": threading.Lock()}

    def make_plan(config: Any, job: str, host: Any) -> Plan:
        return Plan(job, [VolumeSource(v, "volume", v, "w") for v in volumes_of[job]], {})

    def run_backup(config: Any, plan: Plan, catalog: Any, host: Any, cancel: Any = None,
                   on_start: Any = None) -> RunResult:
        with state["lock"]:
            busy = set(plan.volumes) & state["active"]
            if busy:
                state["overlaps"].append(plan.job)
            state["active"] |= set(plan.volumes)
            state["ran"].append(plan.job)
        time.sleep(hold)
        with state["lock"]:
            state["active"] -= set(plan.volumes)
        return RunResult("", status, [] if status == "succeeded" else ["boom"])

    monkeypatch.setattr(sched_mod, "make_plan", make_plan)
    monkeypatch.setattr(sched_mod, "run_backup", run_backup)
    return state


def run_concurrently(sidecar: Sidecar, jobs: list[str]) -> None:
    threads = [threading.Thread(target=sidecar.fire, args=(BACKUP, j)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_jobs_sharing_a_volume_never_copy_it_at_the_same_time(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["shared", "a_only"]}, "b": {"volumes": ["shared"]},
                        "c": {"volumes": ["c_only"]}})
    state = fake_backup_engine(monkeypatch, {"a": ["shared", "a_only"], "b": ["shared"], "c": ["c_only"]}, 0.3)
    sidecar = Sidecar(config, Catalog(f"sqlite:///{tmp_path / 'c.db'}"), host_factory=lambda c: None,
                      verify=None, clock=clock)
    started = time.monotonic()
    run_concurrently(sidecar, ["a", "b", "c"])
    assert sorted(state["ran"]) == ["a", "b", "c"]
    assert state["overlaps"] == []
    assert time.monotonic() - started < 0.9, "c shares nothing and ran alongside"


# ---------------------------------------------------------------- a scheduled backup's follow-ups


def test_a_successful_backup_is_followed_by_prune_when_the_job_has_retention(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["v"], "retention": {"keep_last": 2}}, "b": {"volumes": ["w"]}})
    fake_backup_engine(monkeypatch, {"a": ["v"], "b": ["w"]}, 0)
    pruned: list[tuple[str, datetime, bool]] = []
    sidecar = Sidecar(config, Catalog(f"sqlite:///{tmp_path / 'c.db'}"), host_factory=lambda c: None,
                      verify=None, clock=clock,
                      prune=lambda cfg, cat, job, now, dry_run=False: pruned.append((job, now, dry_run)))
    sidecar.fire(BACKUP, "a")
    sidecar.fire(BACKUP, "b")
    assert pruned == [("a", T0, False)]


def test_without_a_prune_function_retention_is_skipped_with_a_warning(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = config_of({"a": {"volumes": ["v"], "retention": {"keep_last": 2}}})
    fake_backup_engine(monkeypatch, {"a": ["v"]}, 0)
    sidecar = Sidecar(config, Catalog(f"sqlite:///{tmp_path / 'c.db'}"), host_factory=lambda c: None,
                      verify=None, clock=clock)
    sidecar.prune_fn = None
    sidecar.fire(BACKUP, "a")
    assert any("retention for job a not applied" in r.getMessage() for r in caplog.records)


def test_a_backup_that_fails_before_starting_is_counted_and_notified(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["v"]}}, notifications={"webhook_url": "http://hook.invalid/x"})

    def make_plan(config: Any, job: str, host: Any) -> Plan:
        raise ConfigError("jobs.a.volumes[0]: volume 'v' does not exist")

    sent: list[Any] = []
    monkeypatch.setattr(sched_mod, "make_plan", make_plan)
    monkeypatch.setattr(sched_mod.notify, "run_finished", lambda s, job, name, report: sent.append(report))
    observed: list[tuple[str, str]] = []
    metrics = SimpleNamespace(observe_run=lambda job, status, secs, backup: observed.append((job, status)))
    sidecar = Sidecar(config, Catalog(f"sqlite:///{tmp_path / 'c.db'}"), host_factory=lambda c: None,
                      verify=None, clock=clock, metrics=metrics)
    sidecar.fire(BACKUP, "a")
    assert observed == [("a", "failed")]
    assert sent[0].status == "failed" and "does not exist" in sent[0].errors[0]


def test_scheduler_log_lines_carry_job_and_run_id(
        clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"schedule": "* * * * *", "volumes": ["v"]}}), clock, tmp_path)
    caplog.set_level("INFO")
    sidecar.fire(BACKUP, "a")
    starting = next(r for r in caplog.records if "starting (run" in r.getMessage())
    assert starting.job == "a" and len(starting.run_id) == 8


# ---------------------------------------------------------------- stopping


def test_stop_lets_a_run_finish_within_the_grace(clock: Clock, tmp_path: Path) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"volumes": ["v"]}}), clock, tmp_path)
    sidecar.actions[BACKUP] = lambda cfg, job, logger: time.sleep(0.3)
    runner = threading.Thread(target=sidecar.fire, args=(BACKUP, "a"))
    runner.start()
    time.sleep(0.05)
    assert sidecar.stop(grace=5) is True
    assert not sidecar.cancel.is_set()


def test_stop_cancels_a_run_that_outlasts_the_grace_and_waits_for_it_to_unwind(clock: Clock, tmp_path: Path) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"volumes": ["v"]}}), clock, tmp_path)
    unwound = threading.Event()

    def long_run(cfg: Any, job: str, logger: Any) -> None:
        sidecar.cancel.wait(30)
        time.sleep(0.1)
        unwound.set()

    sidecar.actions[BACKUP] = long_run
    threading.Thread(target=sidecar.fire, args=(BACKUP, "a")).start()
    time.sleep(0.05)
    started = time.monotonic()
    assert sidecar.stop(grace=0.2) is False
    assert unwound.is_set() and sidecar.running() == []
    assert time.monotonic() - started < 5


def test_no_run_starts_once_stopping(clock: Clock, tmp_path: Path) -> None:
    sidecar, calls = make_sidecar(config_of({"a": {"volumes": ["v"]}}), clock, tmp_path)
    sidecar.stop(grace=0)
    sidecar.fire(BACKUP, "a")
    assert calls == []


def test_the_daemon_reloads_on_sighup_flag_and_exits_0_on_stop(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "backupd.yml"
    path.write_text("jobs:\n  a:\n    schedule: '0 3 * * *'\n    volumes: [v]\n")
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    monkeypatch.setattr("backupd.daemon.prepare_engine", lambda config, catalog: None)
    made: list[Sidecar] = []
    real = sched_mod.Sidecar

    def capture(*args: Any, **kwargs: Any) -> Sidecar:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("backupd.daemon.Sidecar", capture)
    signals = Signals()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_daemon(str(path), parse_config({"jobs": {"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}}),
                   catalog, None, signals)))
    thread.start()
    deadline = time.monotonic() + 5
    while not made or not made[0].alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    path.write_text("jobs:\n  b:\n    schedule: '0 4 * * *'\n    volumes: [v]\n")
    signals._on_reload(1, None)
    while [e.job for e in made[0].entries()] != ["b"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    signals._on_stop(15, None)
    thread.join(10)
    assert result == [0] and not made[0].alive()


# ---------------------------------------------------------------- health


def test_a_job_is_overdue_after_two_scheduled_runs_without_success() -> None:
    entry = Entry(BACKUP, "a", "0 * * * *", "UTC")
    since = datetime(2024, 1, 1, 0, 30, tzinfo=UTC)
    assert not is_overdue(entry, None, since, datetime(2024, 1, 1, 1, 59, tzinfo=UTC))
    assert is_overdue(entry, None, since, datetime(2024, 1, 1, 2, 0, tzinfo=UTC))
    ok = datetime(2024, 1, 1, 2, 0, 5, tzinfo=UTC)
    assert not is_overdue(entry, ok, since, datetime(2024, 1, 1, 3, 30, tzinfo=UTC))
    assert is_overdue(entry, ok, since, datetime(2024, 1, 1, 4, 0, tzinfo=UTC))


def test_health_is_503_material_when_a_job_is_overdue_or_the_catalog_is_down(clock: Clock, tmp_path: Path) -> None:
    sidecar, _ = make_sidecar(config_of({"a": {"schedule": "0 * * * *", "volumes": ["v"]}}), clock, tmp_path)
    sidecar.start()
    healthy, report = sidecar.health(datetime(2024, 1, 1, 1, 0, tzinfo=UTC))
    assert healthy and report["jobs"]["a"]["overdue"] is False and report["catalog"]["reachable"]
    healthy, report = sidecar.health(datetime(2024, 1, 1, 2, 0, tzinfo=UTC))
    assert not healthy and report["jobs"]["a"]["overdue"] is True

    def down() -> None:
        raise OSError("gone")

    sidecar.catalog.ping = down  # type: ignore[method-assign]
    healthy, report = sidecar.health(datetime(2024, 1, 1, 0, 1, tzinfo=UTC))
    assert not healthy and report["catalog"] == {"reachable": False, "error": "OSError"}
