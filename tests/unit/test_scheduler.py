"""Scheduling decisions with a controllable clock: APScheduler is driven step by step
(`_process_jobs`) with its notion of "now" replaced, so no test waits for a real minute."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
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
from backupd.app import BackupOutcome, resources_of
from backupd.catalog import Catalog
from backupd.config import Config, parse_config
from backupd.daemon import Signals, reload_config, run_daemon
from backupd.docker_host import VolumeSource
from backupd.errors import ConfigError
from backupd.prune import PruneReport
from backupd.scheduler import (
    BACKUP,
    PRUNE,
    VERIFY,
    Entry,
    Sidecar,
    cron_trigger,
    entries_of,
    is_overdue,
    next_runs,
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


class FakeOps:
    """Operations (backupd.app) that record their calls. The real App behind the same
    interface is exercised by tests/integration/test_daemon.py."""

    def __init__(self, outcome: BackupOutcome | Exception | None = None) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, str]] = []

    def backup(self, job: str, *, config: Config | None = None, cancel: threading.Event | None = None,
               stop: threading.Event | None = None, on_start: Any = None,
               wait: float | None = None) -> BackupOutcome:
        self.calls.append((BACKUP, job))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome or BackupOutcome(job, None, "succeeded", [])

    def prune(self, job: str, *, config: Config | None = None, stop: threading.Event | None = None,
              dry_run: bool = False) -> PruneReport:
        self.calls.append((PRUNE, job))
        return PruneReport(job, [])

    def verify_latest(self, job: str, *, config: Config | None = None,
                      stop: threading.Event | None = None) -> list[str]:
        self.calls.append((VERIFY, job))
        return []

    def end_helpers(self) -> int:
        self.calls.append(("end_helpers", ""))
        return 0


def make_sidecar(config: Any, clock: Clock, tmp_path: Path, threaded: bool = False,
                 ops: FakeOps | None = None, **kwargs: Any) -> tuple[Sidecar, list[tuple[str, str]]]:
    executor = ThreadPoolExecutor(4) if threaded else DebugExecutor()
    scheduler = ManualScheduler(timezone=UTC, executors={"default": executor})
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    sidecar = Sidecar(config, ops or FakeOps(), catalog, scheduler=scheduler, clock=clock, **kwargs)
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


def test_resources_of_a_job_are_the_job_its_volumes_and_every_container_it_touches() -> None:
    config = config_of({"a": {"volumes": ["v"], "stop_containers": ["app", {"label": "x=y"}],
                              "databases": [{"name": "db", "type": "postgres", "container": "pg"}],
                              "hooks": {"before": [{"command": "true", "container": "web"}]}}})
    volumes = [VolumeSource("v", "volume", "v", "w"), VolumeSource("p", "bind", "/srv/p", "w")]
    stopped = [SimpleNamespace(name="app"), SimpleNamespace(name="labelled")]  # as resolved by the plan
    assert resources_of("a", config.jobs["a"], volumes, stopped) == [
        "bind:/srv/p", "container:app", "container:labelled", "container:pg", "container:web",
        "job:a", "volume:v"]


# ---------------------------------------------------------------- a scheduled backup's follow-ups


def test_a_successful_backup_is_followed_by_prune_when_the_job_has_retention(
        clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["v"], "retention": {"keep_last": 2}}, "b": {"volumes": ["w"]}})
    ops = FakeOps()
    sidecar, _ = make_sidecar(config, clock, tmp_path, ops=ops)
    sidecar.actions = {BACKUP: sidecar.backup, PRUNE: sidecar.prune, VERIFY: sidecar.verify}
    sidecar.fire(BACKUP, "a")
    sidecar.fire(BACKUP, "b")
    assert ops.calls == [(BACKUP, "a"), (PRUNE, "a"), (BACKUP, "b")]


def test_a_failed_backup_is_not_followed_by_prune(clock: Clock, tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["v"], "retention": {"keep_last": 2}}})
    ops = FakeOps(BackupOutcome("a", "b1", "failed", ["boom"]))
    sidecar, _ = make_sidecar(config, clock, tmp_path, ops=ops)
    sidecar.actions = {BACKUP: sidecar.backup, PRUNE: sidecar.prune, VERIFY: sidecar.verify}
    sidecar.fire(BACKUP, "a")
    assert ops.calls == [(BACKUP, "a")]


@pytest.mark.parametrize("failure", [
    BackupOutcome("a", "b1", "failed", ["jobs.a.volumes[0]: volume 'v' does not exist"]),
    RuntimeError("(sqlite3.OperationalError) database or disk is full"),
], ids=["planning failed", "catalog outage"])
def test_a_failed_backup_is_counted_notified_and_logged_whatever_failed(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        failure: Any) -> None:
    config = config_of({"a": {"volumes": ["v"]}}, notifications={"webhook_url": "http://hook.invalid/x"})
    sent: list[Any] = []
    monkeypatch.setattr(sched_mod.notify, "run_finished", lambda s, job, name, report: sent.append(report))
    observed: list[tuple[str, str]] = []
    metrics = SimpleNamespace(observe_run=lambda job, status, secs, backup: observed.append((job, status)))
    sidecar, _ = make_sidecar(config, clock, tmp_path, ops=FakeOps(failure), metrics=metrics)
    sidecar.actions = {BACKUP: sidecar.backup, PRUNE: sidecar.prune, VERIFY: sidecar.verify}
    sidecar.fire(BACKUP, "a")
    assert observed == [("a", "failed")]
    assert sent[0].status == "failed"
    assert ("does not exist" in sent[0].errors[0]) or ("disk is full" in sent[0].errors[0])
    assert any(r.levelname == "ERROR" and r.job == "a" for r in caplog.records)


def test_warnings_of_a_successful_run_are_notified(monkeypatch: pytest.MonkeyPatch, clock: Clock,
                                                   tmp_path: Path) -> None:
    config = config_of({"a": {"volumes": ["v"]}}, notifications={"webhook_url": "http://hook.invalid/x"})
    posted: list[bytes] = []
    monkeypatch.setattr(sched_mod.notify, "_send", lambda method, url, body, timeout, what: posted.append(body))
    ops = FakeOps(BackupOutcome("a", None, "succeeded", [], ["jobs.a.hooks.before[0] (true) exited 1"]))
    sidecar, _ = make_sidecar(config, clock, tmp_path, ops=ops)
    sidecar.actions = {BACKUP: sidecar.backup, PRUNE: sidecar.prune, VERIFY: sidecar.verify}
    sidecar.fire(BACKUP, "a")
    import json as _json
    assert [_json.loads(b)["warnings"] for b in posted] == [["jobs.a.hooks.before[0] (true) exited 1"]]


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


def test_a_cancelled_run_blocked_on_a_helper_is_freed_by_ending_the_helpers(clock: Clock, tmp_path: Path) -> None:
    """A run waiting on a helper (a restic snapshot) never looks at the cancel flag: the stop ends
    this backupd's helpers, again each second for one started late, until the run has unwound."""
    ops = FakeOps()
    sidecar, _ = make_sidecar(config_of({"a": {"volumes": ["v"]}}), clock, tmp_path, ops=ops)
    helper_ended = threading.Event()
    ends: list[float] = []

    def end_helpers() -> int:
        ends.append(time.monotonic())
        if len(ends) == 2:  # the first removal missed the helper the run started just then
            helper_ended.set()
        return 1

    ops.end_helpers = end_helpers  # type: ignore[method-assign]
    sidecar.actions[BACKUP] = lambda cfg, job, logger: helper_ended.wait(30)
    threading.Thread(target=sidecar.fire, args=(BACKUP, "a")).start()
    time.sleep(0.05)
    started = time.monotonic()
    assert sidecar.stop(grace=0.2) is False
    assert sidecar.running() == [] and len(ends) == 2
    assert time.monotonic() - started < 5


def test_no_run_starts_once_stopping(clock: Clock, tmp_path: Path) -> None:
    sidecar, calls = make_sidecar(config_of({"a": {"volumes": ["v"]}}), clock, tmp_path)
    sidecar.stop(grace=0)
    sidecar.fire(BACKUP, "a")
    assert calls == []


@dataclass
class InProcessDaemon:
    """run_daemon in a thread on a real catalog, with the Sidecar it built and its result."""

    path: Path
    sidecar: Sidecar
    signals: Signals
    thread: threading.Thread
    result: list[int]


def start_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheduler: dict | None = None,
                 **app_extra: Any) -> InProcessDaemon:
    """Job a at 03:00 in the config file; returns once the scheduler is alive."""
    path = tmp_path / "backupd.yml"
    path.write_text("jobs:\n  a:\n    schedule: '0 3 * * *'\n    volumes: [v]\n")
    config = parse_config({"catalog": f"sqlite:///{tmp_path / 'c.db'}", "scheduler": scheduler or {},
                           "jobs": {"a": {"schedule": "0 3 * * *", "volumes": ["v"]}}})
    app = SimpleNamespace(config=config, catalog=Catalog(config.catalog), clock=lambda: T0, host=None, **app_extra)
    made: list[Sidecar] = []
    real = sched_mod.Sidecar

    def capture(*args: Any, **kwargs: Any) -> Sidecar:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr("backupd.daemon.Sidecar", capture)
    signals = Signals()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_daemon(str(path), app, None, signals)))  # type: ignore[arg-type]
    thread.start()
    deadline = time.monotonic() + 5
    while not made or not made[0].alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return InProcessDaemon(path, made[0], signals, thread, result)


def test_the_daemon_reloads_on_sighup_flag_and_exits_0_on_stop(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    daemon = start_daemon(monkeypatch, tmp_path)
    deadline = time.monotonic() + 5
    daemon.path.write_text("jobs:\n  b:\n    schedule: '0 4 * * *'\n    volumes: [v]\n")
    daemon.signals._on_reload(1, None)
    while [e.job for e in daemon.sidecar.entries()] != ["b"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon.signals._on_stop(15, None)
    daemon.thread.join(10)
    assert daemon.result == [0] and not daemon.sidecar.alive()


def test_a_run_that_ignores_its_cancel_makes_the_daemon_exit_1_at_once_not_wait_forever(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run stuck where neither the cancel nor ending the helpers reaches it (a hook's exec
    that hangs): the stop gives up after CANCEL_WAIT and the daemon reports it with exit 1;
    `backupd run` then leaves without waiting for the run's thread (see test_cli)."""
    monkeypatch.setattr(sched_mod, "CANCEL_WAIT", 0.3)
    daemon = start_daemon(monkeypatch, tmp_path, {"stop_grace": "1s"}, end_helpers=lambda: 0)
    deadline = time.monotonic() + 5
    release = threading.Event()
    daemon.sidecar.actions[BACKUP] = lambda cfg, job, logger: release.wait(30)  # deaf to the cancel
    threading.Thread(target=daemon.sidecar.fire, args=(BACKUP, "a")).start()
    while not daemon.sidecar.running():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon.signals._on_stop(15, None)
    daemon.thread.join(10)
    release.set()
    assert daemon.result == [1]


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
