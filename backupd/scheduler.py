"""The sidecar's scheduler: one APScheduler entry per schedule, run policies, clean stop.

Policies, all decided here:
- an entry never overlaps itself (max_instances=1);
- runs missed while backupd was down or busy coalesce into one run, and only
  if it is still within ``scheduler.misfire_grace`` of the missed time;
- runs that touch a common volume or container take per-resource locks in
  sorted order, so two jobs never copy one volume or stop one container at
  once, and two runs can never deadlock on each other's locks;
- on stop no new run starts; running ones get ``scheduler.stop_grace`` to
  finish, then are cancelled through the event run_backup already honours.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING, BaseScheduler
from apscheduler.triggers.cron import CronTrigger

from backupd import notify
from backupd.catalog import FAILED, SUCCEEDED, Catalog, utcnow
from backupd.config import Config, Job
from backupd.errors import BackupdError, ConfigError
from backupd.run import make_plan, run_backup

log = logging.getLogger(__name__)

BACKUP, PRUNE, VERIFY = "backup", "prune", "verify"
CANCEL_WAIT = 120.0  # after stop_grace: how long a cancelled run may take to unwind
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

PruneFn = Callable[..., Any]  # prune_job(config, catalog, job_name, now, dry_run=False)
VerifyFn = Callable[[Config, Catalog, str], Any]


class Stopping(BackupdError):
    """backupd is stopping: a run that had not started yet is not started."""


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


# ---------------------------------------------------------------- shared resources


def resources_of(job_name: str, job: Job, volumes: Iterable[Any]) -> list[str]:
    """What a run must hold alone: the job itself, each volume or host path, each named container.

    Containers picked by label are not known before the quiesce step resolves
    them, so they are not locked here.
    """
    names = {f"job:{job_name}"}
    names.update(f"{v.kind}:{v.source}" for v in volumes)
    names.update(f"container:{c.name}" for c in job.stop_containers if c.name)
    names.update(f"container:{d.container}" for d in job.databases if d.container)
    for hook in (*job.hooks.before, *job.hooks.after):
        if hook.container:
            names.add(f"container:{hook.container}")
    return sorted(names)


class ResourceLocks:
    """A lock per resource name, taken in sorted order so two runs never deadlock."""

    def __init__(self, poll: float = 0.2) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._poll = poll

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def held(self) -> list[str]:
        with self._guard:
            return sorted(n for n, lock in self._locks.items() if lock.locked())

    @contextmanager
    def hold(self, names: Iterable[str], stop: threading.Event,
             waiting: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold every named lock; give up with Stopping if `stop` is set while waiting."""
        taken: list[threading.Lock] = []
        try:
            for name in sorted(set(names)):
                lock = self._lock(name)
                if not lock.acquire(blocking=False):
                    if waiting is not None:
                        waiting(name)
                    while not lock.acquire(timeout=self._poll):
                        if stop.is_set():
                            raise Stopping(f"stopped while waiting for {name}")
                taken.append(lock)
            if stop.is_set():
                raise Stopping("stopped before the run started")
            yield
        finally:
            for lock in reversed(taken):
                lock.release()


# ---------------------------------------------------------------- the sidecar


@dataclass
class RunningRun:
    run_id: str
    action: str
    job: str
    started_at: datetime
    backup_id: str | None = None


def _default_prune() -> PruneFn | None:
    try:
        from backupd.prune import prune_job  # type: ignore[import-not-found]
    except ImportError:
        return None
    return prune_job


def verify_latest(config: Config, catalog: Catalog, job_name: str) -> list[str]:
    """Check the newest successful backup of a job on every destination; return the problems."""
    from backupd.storage import open_store
    from backupd.verify import verify_backup

    backups = catalog.list(job=job_name, statuses=[SUCCEEDED])
    if not backups:
        return [f"job {job_name} has no successful backup to verify"]
    stores = {n: open_store(n, spec) for n, spec in config.job_destinations(job_name).items()}
    checks = verify_backup(config, catalog, stores, backups[0].id)
    return [f"{c.artifact} on {c.destination}: {c.detail}" for c in checks if not c.ok]


def docker_host_for(config: Config) -> Any:
    from backupd.docker_host import DockerHost, connect

    return DockerHost(connect(), config.helper_image, config.helper_memory)


class Sidecar:
    """Owns the APScheduler instance, the locks, and the record of what is running."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        host_factory: Callable[[Config], Any] = docker_host_for,
        prune: PruneFn | None = None,
        verify: VerifyFn | None = verify_latest,
        metrics: Any = None,
        scheduler: BaseScheduler | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.host_factory = host_factory
        self.prune_fn = prune if prune is not None else _default_prune()
        self.verify_fn = verify
        self.metrics = metrics
        self.clock = clock
        self.scheduler = scheduler or BackgroundScheduler(
            timezone=timezone.utc, executors={"default": ThreadPoolExecutor(8)})
        self.locks = ResourceLocks()
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

    def reload(self, config: Config) -> None:
        """Take a new config: entries added, removed or rescheduled; running runs keep the old one.

        Raises ConfigError (and changes nothing) if the new config's schedules are invalid.
        """
        new = {e.id: e for e in entries_of(config)}
        self.config = config
        self._apply(config, new)
        log.info("config reloaded: %d scheduled entr%s", len(new), "y" if len(new) == 1 else "ies")
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
        """make_plan + run_backup under the job's resource locks, then metrics, notices, prune."""
        job = config.job(job_name)
        started = time.monotonic()
        notify.run_started(config.notifications, job_name)
        backup_id: str | None = None
        try:
            host = self.host_factory(config)
            plan = make_plan(config, job_name, host)
            with self.locks.hold(resources_of(job_name, job, plan.volumes), self.stopping,
                                 waiting=lambda r: logger.info("waiting for %s (used by another run)", r)):
                result = run_backup(config, plan, self.catalog, host, cancel=self.cancel,
                                    on_start=lambda bid: logging.LoggerAdapter(
                                        log, {**(logger.extra or {}), "backup_id": bid}
                                    ).info("run %s is backup %s", logger.extra["run_id"], bid))
            backup_id, status, errors = result.backup_id, result.status, result.errors
        except Stopping:
            raise
        except BackupdError as exc:
            status, errors = FAILED, [str(exc)]
            logger.error("backup of job %s failed before it started: %s", job_name, exc)
        duration = time.monotonic() - started
        backup = self.catalog.get(backup_id) if backup_id else None
        if self.metrics is not None:
            self.metrics.observe_run(job_name, status, duration, backup)
        notify.run_finished(config.notifications, job, job_name,
                            notify.RunReport(job_name, backup_id, status, errors, backup))
        retention = config.job_retention(job_name)
        if status != FAILED and retention is not None and not retention.schedule and not self.cancel.is_set():
            self.prune(config, job_name, logger)

    def prune(self, config: Config, job_name: str, logger: logging.LoggerAdapter) -> None:
        if self.prune_fn is None:
            logger.warning("retention for job %s not applied: this backupd has no prune", job_name)
            return
        with self.locks.hold([f"job:{job_name}"], self.stopping):
            self.prune_fn(config, self.catalog, job_name, self.clock(), dry_run=False)

    def verify(self, config: Config, job_name: str, logger: logging.LoggerAdapter) -> None:
        if self.verify_fn is None:
            logger.warning("verification of job %s skipped: no verifier", job_name)
            return
        with self.locks.hold([f"job:{job_name}"], self.stopping):
            problems = self.verify_fn(config, self.catalog, job_name)
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
        if not self._wait_idle(CANCEL_WAIT):
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
            backups = self.catalog.list(job=entry.job)
            last = next((b for b in backups if b.status != "running"), None)
            last_ok = next((b for b in backups if b.status == SUCCEEDED), None)
            when = times.get(entry.id)
            jobs[entry.job] = {
                "schedule": entry.cron,
                "running": (BACKUP, entry.job) in running,
                "next_run": when.isoformat() if when else None,
                "last_run": None if last is None else {
                    "backup_id": last.id, "status": last.status,
                    "finished_at": last.finished_at.isoformat() if last.finished_at else None},
                "last_success": last_ok.finished_at.isoformat() if last_ok and last_ok.finished_at else None,
                "overdue": is_overdue(entry, last_ok.finished_at if last_ok else None, self.started_at, now),
            }
        report["jobs"] = jobs
        healthy = report["scheduler"]["alive"] and not any(j["overdue"] for j in jobs.values())
        report["healthy"] = healthy
        return healthy, report
