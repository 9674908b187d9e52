"""The sidecar's scheduler: one APScheduler entry per schedule, run policies, clean stop.

Policies, all decided here:
- an entry never overlaps itself (max_instances=1);
- runs missed while backupd was down or busy coalesce into one run, and only
  if it is still within ``scheduler.misfire_grace`` of the missed time;
- runs that touch a common job, volume or container wait for each other's
  leases in the catalog (backupd.catalog.leases), which also keep the daemon
  and a CLI command, or two hosts sharing a catalog, apart;
- on stop no new run starts; running ones get ``scheduler.stop_grace`` to
  finish, then are cancelled through the event run_backup already honours.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING, BaseScheduler
from apscheduler.triggers.cron import CronTrigger

from backupd import notify
from backupd.app import Operations
from backupd.catalog import FAILED, SUSPICIOUS, BackupView, Catalog, utcnow
from backupd.catalog.leases import Stopping
from backupd.config import Config
from backupd.errors import ConfigError
from backupd.metrics import Metrics

log = logging.getLogger(__name__)

BACKUP, PRUNE, VERIFY = "backup", "prune", "verify"
CANCEL_WAIT = 30.0  # after stop_grace: how long a cancelled run may take to unwind (README: stop grace)
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

# ---------------------------------------------------------------- what to schedule


@dataclass(frozen=True)
class Entry:
    """One scheduled thing: a job's backup, its retention, or its verification."""

    action: str
    job: str
    cron: str
    timezone: str
    jitter: float | None = None

    @property
    def id(self) -> str:
        return f"{self.action}:{self.job}"


def entries_of(config: Config) -> list[Entry]:
    """Every schedule in the config; a bad retention schedule is a ConfigError naming its key."""
    from backupd.config import validate_cron

    entries = []
    for name, job in config.jobs.items():
        jitter = job.jitter.total_seconds() if job.jitter else None
        if job.schedule:
            entries.append(Entry(BACKUP, name, job.schedule, job.timezone, jitter))
        retention = config.job_retention(name)
        if retention is not None and retention.schedule:
            key = f"jobs.{name}.retention.schedule" if job.retention else "retention.schedule"
            try:
                validate_cron(retention.schedule)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            entries.append(Entry(PRUNE, name, retention.schedule, job.timezone, jitter))
        if job.verify_schedule:
            entries.append(Entry(VERIFY, name, job.verify_schedule, job.timezone, jitter))
    return entries


def cron_weekdays(field: str) -> str:
    """Translate a cron weekday field (0 or 7 = Sunday) into names.

    APScheduler 3 counts 0 as Monday, so handing it "0" would run a Sunday job
    on Mondays; names mean the same to both.
    """
    if field == "*" or not any(ch.isdigit() for ch in field):
        return field
    days: set[int] = set()
    for item in field.split(","):
        base, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            first, last = (int(x) for x in base.split("-", 1))
        else:
            first = last = int(base)
            if step_text:
                last = 6
        if not (0 <= first <= 7 and 0 <= last <= 7) or first > last:
            raise ValueError(f"weekday field '{field}' is not valid cron")
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_CRON_DAYS[d] for d in sorted(days))


def cron_trigger(entry: Entry, with_jitter: bool = True) -> CronTrigger:
    minute, hour, day, month, weekday = entry.cron.split()
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=cron_weekdays(weekday), timezone=ZoneInfo(entry.timezone),
                       jitter=int(entry.jitter) if with_jitter and entry.jitter else None)


def next_runs(config: Config, now: datetime) -> list[tuple[Entry, datetime | None]]:
    """When each entry fires next after `now` (without jitter): for logs and `list --schedule`."""
    return [(e, cron_trigger(e, with_jitter=False).get_next_fire_time(None, now)) for e in entries_of(config)]


def is_overdue(entry: Entry, last_success: datetime | None, since: datetime, now: datetime) -> bool:
    """Two scheduled runs have come and gone with no success after the reference time.

    The reference is the last success, or when the sidecar started if the job
    never succeeded (a fresh sidecar is not overdue at once).
    """
    trigger = cron_trigger(entry, with_jitter=False)
    reference = max(filter(None, (last_success, since)))
    fire, missed = reference, 0
    while missed < 2:
        fire = trigger.get_next_fire_time(None, fire + timedelta(seconds=1))
        if fire is None or fire > now:
            return False
        missed += 1
    return True


# ---------------------------------------------------------------- the sidecar


@dataclass
class RunningRun:
    run_id: str
    action: str
    job: str
    started_at: datetime
    backup_id: str | None = None


class Sidecar:
    """Owns the APScheduler instance and the record of what is running; the work itself is
    the Operations it is handed (the App)."""

    def __init__(
        self,
        config: Config,
        ops: Operations,
        catalog: Catalog,
        *,
        metrics: Metrics | None = None,
        scheduler: BaseScheduler | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.ops = ops
        self.catalog = catalog
        self.metrics = metrics
        self.clock = clock
        self.scheduler = scheduler or BackgroundScheduler(
            timezone=timezone.utc, executors={"default": ThreadPoolExecutor(8)})
        self.stopping = threading.Event()  # no new run starts
        self.cancel = threading.Event()  # running runs abort
        self.actions: dict[str, Callable[[Config, str, logging.LoggerAdapter], None]] = {
            BACKUP: self.backup, PRUNE: self.prune, VERIFY: self.verify}
        self.started_at = clock()
        self._entries: dict[str, Entry] = {}
        self.skipped: list[tuple[str, int]] = []  # (entry id, APScheduler event code)
        self._running: dict[str, RunningRun] = {}
        self._cond = threading.Condition()

    # ------------------------------------------------------------ scheduling

    def _job_options(self, config: Config) -> dict[str, Any]:
        return {"max_instances": 1, "coalesce": True,
                "misfire_grace_time": max(1, int(config.scheduler.misfire_grace.total_seconds()))}

    def start(self) -> None:
        """Add every entry, start the scheduler thread, log when each entry runs next."""
        self.started_at = self.clock()
        self._apply(self.config, {e.id: e for e in entries_of(self.config)})
        self.scheduler.add_listener(self._on_skip, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
        self.scheduler.start()
        self.log_next_runs()

    def _on_skip(self, event: Any) -> None:
        """APScheduler dropped a run: say which job and why, in our own log fields."""
        action, _, job_name = event.job_id.partition(":")
        why = ("the previous run is still going" if event.code == EVENT_JOB_MAX_INSTANCES
               else "missed by more than scheduler.misfire_grace")
        times = getattr(event, "scheduled_run_times", None) or [getattr(event, "scheduled_run_time", None)]
        self.skipped.append((event.job_id, event.code))
        log.warning("%s of job %s scheduled at %s skipped: %s", action, job_name,
                    ", ".join(t.isoformat() for t in times if t), why, extra={"job": job_name})

    def _apply(self, config: Config, new: dict[str, Entry]) -> None:
        options = self._job_options(config)
        for entry_id in set(self._entries) - set(new):
            self.scheduler.remove_job(entry_id)
        for entry_id, entry in new.items():
            old = self._entries.get(entry_id)
            if old == entry:
                self.scheduler.modify_job(entry_id, **options)  # keeps its next run time
            elif old is not None:
                self.scheduler.modify_job(entry_id, **options)
                self.scheduler.reschedule_job(entry_id, trigger=cron_trigger(entry))
            else:
                self.scheduler.add_job(self.fire, cron_trigger(entry), args=[entry.action, entry.job],
                                       id=entry_id, name=entry_id, **options)
        self._entries = new

    def reload(self, config: Config, why: str = "config reloaded") -> None:
        """Take a new config (a reloaded file, or jobs container labels added, changed or
        removed): entries added, removed or rescheduled; running runs keep the old one.

        Raises ConfigError (and changes nothing) if the new config's schedules are invalid.
        """
        new = {e.id: e for e in entries_of(config)}
        self.config = config
        self._apply(config, new)
        log.info("%s: %d scheduled entr%s", why, len(new), "y" if len(new) == 1 else "ies")
        self.log_next_runs()

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def next_run_times(self) -> dict[str, datetime | None]:
        return {job.id: job.next_run_time for job in self.scheduler.get_jobs()}

    def log_next_runs(self) -> None:
        times = self.next_run_times()
        for entry in self._entries.values():
            when = times.get(entry.id)
            log.info("%s of job %s (%s %s) next runs at %s", entry.action, entry.job, entry.cron,
                     entry.timezone, when.isoformat() if when else "never", extra={"job": entry.job})

    def alive(self) -> bool:
        if self.scheduler.state != STATE_RUNNING:
            return False
        thread = getattr(self.scheduler, "_thread", None)
        return thread is None or thread.is_alive()

    # ------------------------------------------------------------ running

    def fire(self, action: str, job_name: str) -> None:
        """What APScheduler calls: one run of one entry, never raising into the scheduler."""
        run_id = uuid.uuid4().hex[:8]
        logger = logging.LoggerAdapter(log, {"job": job_name, "run_id": run_id})
        if self.stopping.is_set():
            logger.info("%s of job %s not started: backupd is stopping", action, job_name)
            return
        config = self.config  # a reload mid-run does not change this run
        run = RunningRun(run_id, action, job_name, self.clock())
        with self._cond:
            self._running[run_id] = run
        logger.info("%s of job %s starting (run %s)", action, job_name, run_id)
        try:
            self.actions[action](config, job_name, logger)
        except Stopping as exc:
            logger.info("%s of job %s not started: %s", action, job_name, exc)
        except Exception as exc:  # noqa: BLE001 - one bad run must not kill the scheduler
            logger.exception("%s of job %s failed: %s", action, job_name, exc)
        finally:
            with self._cond:
                del self._running[run_id]
                self._cond.notify_all()

    def running(self) -> list[RunningRun]:
        with self._cond:
            return list(self._running.values())

    def backup(self, config: Config, job_name: str, logger: logging.LoggerAdapter) -> None:
        """One backup through the operations, then metrics, notices and retention.

        Whatever goes wrong (a catalog outage included) is still logged, counted and
        notified: a run never ends without a trace. The catalog row such a run may have
        left `running` is failed by the next start-up's recovery.
        """
        job = config.job(job_name)
        started = time.monotonic()
        notify.run_started(config.notifications, job_name)
        warnings: list[str] = []
        try:
            outcome = self.ops.backup(
                job_name, config=config, cancel=self.cancel, stop=self.stopping,
                on_start=lambda bid: logging.LoggerAdapter(log, {**(logger.extra or {}), "backup_id": bid})
                .info("run %s is backup %s", (logger.extra or {}).get("run_id"), bid))
            backup_id, status, errors, warnings = outcome.backup_id, outcome.status, outcome.errors, outcome.warnings
        except Stopping:
            raise
        except Exception as exc:  # noqa: BLE001 - the catalog or engine failed under the run
            backup_id, status, errors = None, FAILED, [f"{type(exc).__name__}: {exc}"]
            logger.error("backup of job %s failed: %s", job_name, errors[0])
        duration = time.monotonic() - started
        backup = self._view(backup_id, logger)
        if self.metrics is not None:
            self.metrics.observe_run(job_name, status, duration, backup)
        notify.run_finished(config.notifications, job, job_name,
                            notify.RunReport(job_name, backup_id, status, errors, backup, warnings))
        retention = config.job_retention(job_name)
        if status != FAILED and retention is not None and not retention.schedule and not self.cancel.is_set():
            self.prune(config, job_name, logger)

    def _view(self, backup_id: str | None, logger: logging.LoggerAdapter) -> BackupView | None:
        if backup_id is None:
            return None
        try:
            return self.catalog.get(backup_id)
        except Exception as exc:  # noqa: BLE001 - report the run without its details
            logger.error("could not read backup %s back from the catalog: %s", backup_id, type(exc).__name__)
            return None

    def prune(self, config: Config, job_name: str, logger: logging.LoggerAdapter) -> None:
        report = self.ops.prune(job_name, config=config, stop=self.stopping)
        if report.failures:
            logger.error("retention of job %s could not delete: %s", job_name, "; ".join(report.failures))

    def verify(self, config: Config, job_name: str, logger: logging.LoggerAdapter) -> None:
        problems = self.ops.verify_latest(job_name, config=config, stop=self.stopping)
        if problems:
            logger.error("verification of job %s found problems: %s", job_name, "; ".join(problems))
            notify.run_finished(config.notifications, config.job(job_name), job_name,
                                notify.RunReport(job_name, None, "verify-failed", list(problems), None))
        else:
            logger.info("verification of job %s: every copy checked out", job_name)

    # ------------------------------------------------------------ stopping

    def _wait_idle(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking runs, let running ones finish within the grace, then cancel them.

        Returns True if nothing had to be cancelled.
        """
        grace = self.config.scheduler.stop_grace.total_seconds() if grace is None else grace
        self.stopping.set()
        if self.scheduler.state == STATE_RUNNING:
            self.scheduler.shutdown(wait=False)
        running = self.running()
        if running:
            log.info("stopping: waiting up to %.0fs for %d run(s) to finish", grace, len(running))
        if self._wait_idle(grace):
            return True
        log.warning("stop_grace of %.0fs passed: cancelling %s", grace,
                    ", ".join(f"{r.action} of {r.job}" for r in self.running()))
        self.cancel.set()
        # A run blocked on a helper (a restic snapshot, a slow dump) sees the cancel only when
        # the helper ends: end this backupd's helpers, again each second for any a run started
        # just before it saw the cancel. Runs then unwind: containers started, run recorded.
        deadline = time.monotonic() + CANCEL_WAIT
        while True:
            self.ops.end_helpers()
            if self._wait_idle(min(1.0, max(0.0, deadline - time.monotonic()))):
                return False
            if time.monotonic() >= deadline:
                log.error("runs still going %.0fs after cancel; exiting anyway", CANCEL_WAIT)
                return False

    # ------------------------------------------------------------ health

    def health(self, now: datetime | None = None) -> tuple[bool, dict[str, Any]]:
        """(healthy, report): scheduler alive, catalog reachable, no job overdue."""
        now = now or self.clock()
        report: dict[str, Any] = {"scheduler": {"alive": self.alive(), "stopping": self.stopping.is_set()}}
        try:
            self.catalog.ping()
            report["catalog"] = {"reachable": True}
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            report["catalog"] = {"reachable": False, "error": type(exc).__name__}
            report["jobs"] = {}
            report["healthy"] = False
            return False, report
        running = {(r.action, r.job) for r in self.running()}
        times = self.next_run_times()
        jobs: dict[str, Any] = {}
        for entry in self._entries.values():
            if entry.action != BACKUP:
                continue
            last, last_ok = self.catalog.last_runs(entry.job)
            when = times.get(entry.id)
            jobs[entry.job] = {
                "schedule": entry.cron,
                "running": (BACKUP, entry.job) in running,
                "next_run": when.isoformat() if when else None,
                "last_run": None if last is None else {
                    "backup_id": last.id, "status": last.status,
                    "finished_at": _iso(self.catalog.finished_at(last.id))},
                "last_success": _iso(last_ok),
                "suspicious": None if last is None or last.status != SUSPICIOUS else last.id,
                "overdue": is_overdue(entry, last_ok, self.started_at, now),
            }
        report["jobs"] = jobs
        healthy = report["scheduler"]["alive"] and not any(j["overdue"] for j in jobs.values())
        report["healthy"] = healthy
        return healthy, report


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
