"""The composition root: the one place that builds backupd from its config.

The CLI and the daemon both get an App, so they cannot drift apart: the same
catalog, the same engine connection, the same start-up recovery, the same
leases, and the same operations (backup, prune, verify, restore). The daemon
is handed the App as `Operations`, a typed interface, never loose callables.

Start-up recovery (the first time a command needs the engine): runs a dead
backupd left `running` are recorded failed, containers it left stopped are
started, its helper containers are removed. "Dead" is judged by the owner
recorded in the catalog (backupd.identity), never by hostname, so it also
works after Compose recreated the sidecar container. The leftovers of its
interrupted uploads are removed from each destination the first time this
process backs up to it (with the run's own connection: a restore, or a job
that does not use a destination, never waits on it).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from backupd.catalog import FAILED, SUCCEEDED, Catalog, utcnow
from backupd.catalog.leases import Conflict, Leases
from backupd.config import Config, Job
from backupd.errors import BackupdError
from backupd.identity import Identity, Liveness, this_process
from backupd.stream import human_bytes

if TYPE_CHECKING:
    from backupd.discovery import Discovered
    from backupd.leftovers import LeftoverReport

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass
class Recovery:
    """What start-up recovery found and undid."""

    failed_runs: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    helpers_removed: int = 0
    pipes_removed: int = 0  # named pipes (and host temp directories) of killed processes
    owners_forgotten: int = 0
    leftovers_removed: int = 0  # partial files and open multipart uploads, as destinations are first used
    leftover_bytes: int = 0

    def __str__(self) -> str:
        if not (self.failed_runs or self.restarted or self.helpers_removed or self.pipes_removed
                or self.leftovers_removed):
            return "nothing left behind by an earlier backupd"
        parts = []
        if self.failed_runs:
            parts.append(f"{len(self.failed_runs)} interrupted run(s) recorded failed "
                         f"({', '.join(self.failed_runs)})")
        if self.restarted:
            parts.append(f"started container(s) left stopped: {', '.join(self.restarted)}")
        if self.helpers_removed:
            parts.append(f"removed {self.helpers_removed} stale helper container(s)")
        if self.pipes_removed:
            parts.append(f"removed {self.pipes_removed} named pipe(s) of killed runs")
        if self.leftovers_removed:
            parts.append(f"removed {self.leftovers_removed} leftover(s) of interrupted uploads "
                         f"({human_bytes(self.leftover_bytes)})")
        return "; ".join(parts)


@dataclass(frozen=True)
class BackupOutcome:
    """What one backup attempt ended as, whether or not it got as far as a catalog row."""

    job: str
    backup_id: str | None
    status: str
    errors: list[str]
    warnings: list[str] = field(default_factory=list)
    planning_error: BackupdError | None = None  # failed before it started (recorded as backup_id)


class Operations(Protocol):
    """What the scheduler may do; App implements it. Typed, so a mismatch fails type checks."""

    def backup(self, job: str, *, config: Config | None = None, cancel: threading.Event | None = None,
               stop: threading.Event | None = None, on_start: Callable[[str], None] | None = None,
               wait: float | None = None) -> BackupOutcome: ...

    def prune(self, job: str, *, config: Config | None = None, stop: threading.Event | None = None,
              dry_run: bool = False) -> Any: ...

    def verify_latest(self, job: str, *, config: Config | None = None,
                      stop: threading.Event | None = None) -> list[str]: ...

    def end_helpers(self) -> int: ...


JOB_LEASE = "job:"


def job_lease(job: str) -> str:
    """The resource a job's runs (backup, prune, verify, restore) hold alone."""
    return JOB_LEASE + job


def resources_of(job_name: str, job: Job, volumes: Iterable[Any], stopped: Iterable[Any]) -> list[str]:
    """What a run must hold alone: the job, each volume or host path, each container it stops,
    dumps from, or runs hooks in."""
    names = {job_lease(job_name)}
    names.update(f"{v.kind}:{v.source}" for v in volumes)
    names.update(f"container:{c.name}" for c in stopped)
    names.update(f"container:{d.container}" for d in job.databases if d.container)
    for hook in (*job.hooks.before, *job.hooks.after):
        if hook.container:
            names.add(f"container:{hook.container}")
    return sorted(names)


class App:
    """backupd built from one config: catalog, identity and leases now; engine on first use."""

    def __init__(self, config: Config, command: str, *, clock: Clock = utcnow,
                 identity: Identity | None = None, connect: Callable[[], Any] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.catalog = Catalog(config.catalog)
        self.leases = Leases(self.catalog.session_factory, Liveness(identity or this_process(command)), clock)
        self._swept: set[str] = set()  # destinations whose leftovers this process removed
        self._sweeping = threading.Lock()
        self._connect = connect
        self._host: Any = None
        self.recovery: Recovery | None = None

    # ------------------------------------------------------------ the engine

    @property
    def host(self) -> Any:
        """The engine; the first use records who we are on it and runs start-up recovery."""
        if self._host is None:
            from backupd.docker_host import DockerHost, connect

            client = (self._connect or connect)()
            host = DockerHost(client, self.config.helper_image, self.config.helper_memory,
                              owner=self.leases.me.id)
            own = host.own_container()
            started = own.attrs.get("State", {}).get("StartedAt") if own is not None else None
            self.leases.set_identity(
                self.leases.me.with_engine(host.engine_id(), own.id if own is not None else None, started),
                host.container_state)
            self.leases.register()  # before any helper carries our owner id
            self._host = host
            self.recovery = self.recover()
        return self._host

    def recover(self, quiet: bool = False) -> Recovery:
        """Undo what dead backupd processes left behind; logs what it found (when `quiet`, only
        if it found something: the daemon repeats this every minute for CLI commands killed
        while it runs)."""
        from backupd.docker_host import remove_dead_pipes
        from backupd.quiesce.stop import recover_held_containers

        host, alive = self.host, self.leases.owner_alive
        report = Recovery()
        report.failed_runs = self.catalog.fail_interrupted(alive)
        for backup_id in report.failed_runs:
            log.warning("backup %s was left running by a stopped backupd: recorded failed", backup_id,
                        extra={"backup_id": backup_id})
        report.restarted = recover_held_containers(self.catalog, host, alive, host.engine_id())
        report.helpers_removed = host.remove_helpers(self.leases.owner_known_dead)
        report.pipes_removed = remove_dead_pipes(self.leases.owner_known_dead)  # before their owners are forgotten
        report.owners_forgotten = self.leases.forget_dead_owners(self.catalog.refers_to_owner)
        if report.failed_runs:  # their uploads may have left leftovers: sweep again at next use
            with self._sweeping:
                self._swept.clear()
        if not quiet:
            log.info("start-up recovery: %s", report)
        elif report.failed_runs or report.restarted or report.helpers_removed or report.pipes_removed:
            log.warning("recovery: %s", report)
        return report

    def sweep_leftovers(self, dry_run: bool = False) -> LeftoverReport:
        """Remove (or, dry, only list) what interrupted uploads left on every destination
        that no live run owns."""
        from backupd.leftovers import sweep_leftovers

        stores = self.stores()
        try:
            return sweep_leftovers(self.catalog, stores, self.leases.owner_alive, dry_run=dry_run,
                                   busy_jobs=self._busy_jobs)
        finally:
            for store in stores.values():
                store.close()

    def _first_use(self, stores: dict[str, Any]) -> None:
        """Recovery's last step, per destination, the first time this process backs up to it
        (and again after a recovery found runs a dead process left): remove the leftovers of
        interrupted uploads no live run owns, with the run's own stores."""
        from backupd.leftovers import sweep_leftovers

        with self._sweeping:
            todo = {name: store for name, store in stores.items() if name not in self._swept}
            self._swept.update(todo)
        if not todo:
            return
        swept = sweep_leftovers(self.catalog, todo, self.leases.owner_alive, busy_jobs=self._busy_jobs)
        if self.recovery is not None:
            self.recovery.leftovers_removed += len(swept.removed)
            self.recovery.leftover_bytes += swept.removed_bytes
        if swept.removed:
            log.info("start-up recovery: removed %d leftover(s) of interrupted uploads (%s) from %s",
                     len(swept.removed), human_bytes(swept.removed_bytes),
                     ", ".join(sorted({f.destination for f in swept.removed})))
        for failure in swept.failures:
            log.warning("start-up recovery: leftovers of interrupted uploads on %s (tried again at "
                        "the next start, or by prune --orphans)", failure)

    def _busy_jobs(self) -> set[str]:
        """Jobs whose lease (see resources_of) a live backupd holds."""
        return {resource.removeprefix(JOB_LEASE) for resource, owner, _ in self.leases.held()
                if resource.startswith(JOB_LEASE) and self.leases.owner_alive(owner)}

    def stores(self, destinations: Iterable[str] | None = None) -> dict[str, Any]:
        from backupd.storage import open_store

        names = list(self.config.destinations) if destinations is None else list(destinations)
        return {n: open_store(n, self.config.destinations[n]) for n in names}

    def close(self) -> None:
        self.leases.close()
        self.catalog.close()

    # ------------------------------------------------------------ operations

    def backup(self, job: str, *, config: Config | None = None, cancel: threading.Event | None = None,
               stop: threading.Event | None = None, on_start: Callable[[str], None] | None = None,
               wait: float | None = None) -> BackupOutcome:
        """Plan, take the leases, run and record one backup of a job.

        A run that fails while planning (unknown volume, engine down, a destination that
        cannot be opened) is recorded failed with its cause, like any other failed run.
        """
        from backupd.run import make_plan, run_backup

        config = config or self.config
        if self._labels_decide(config, job):
            try:  # labels are read again at each run: the container may have changed since
                found = self.discover(config)
            except BackupdError as exc:
                return self._failed_before_start(job, exc)
            broken = found.broken(job)
            if broken is not None:
                return self._failed_before_start(job, broken)
            config = found.config
            if job not in config.jobs:
                from backupd.discovery import unknown_job

                raise unknown_job(config, job)
        spec = config.job(job)
        try:
            host = self.host
            plan = make_plan(config, job, host)
        except BackupdError as exc:
            return self._failed_before_start(job, exc)
        try:
            self._first_use(plan.stores)
            with self.leases.hold(resources_of(job, spec, plan.volumes, plan.stop), f"backup of job {job}",
                                  stop=stop, wait=wait, on_wait=_waiting_logger(job)):
                result = run_backup(config, plan, self.catalog, host, cancel=cancel, on_start=on_start,
                                    clock=self.clock, owner=self.leases.me.id)
        except BaseException:
            for store in plan.stores.values():
                store.close()
            raise
        warnings = list(result.warnings)
        if result.status == SUCCEEDED:
            suspicion = self.guard_shrinkage(config, job, result.backup_id)
            if suspicion is not None:
                warnings.append(f"suspicious: {suspicion}")
        return BackupOutcome(job, result.backup_id, result.status, result.errors, warnings)

    def _failed_before_start(self, job: str, exc: BackupdError) -> BackupOutcome:
        """A run that failed while planning is recorded failed with its cause, like any other."""
        backup_id = self.catalog.record_failed_run(job, f"planning failed: {exc}", self.clock(),
                                                   self.leases.register())
        log.error("backup of job %s failed before it started: %s", job, exc,
                  extra={"job": job, "backup_id": backup_id})
        return BackupOutcome(job, backup_id, FAILED, [str(exc)], planning_error=exc)

    @staticmethod
    def _labels_decide(config: Config, job: str) -> bool:
        """Whether container labels define this job (or may): discovery is on and the config
        file does not name it."""
        from backupd.discovery import is_discovered

        return config.discovery.enabled and (job not in config.jobs or is_discovered(config, job))

    def discover(self, config: Config | None = None) -> "Discovered":
        """The config with the jobs container labels declare (backupd.discovery), read now."""
        from docker.errors import DockerException
        from requests import RequestException

        from backupd.discovery import Discovered, configured, discover, read_containers

        config = config or self.config
        if not config.discovery.enabled:
            return Discovered(configured(config))
        try:
            containers = read_containers(self.host.client)
        except (DockerException, RequestException) as exc:  # an engine gone away raises the latter
            raise BackupdError(f"cannot read container labels from the Docker engine: "
                               f"{type(exc).__name__}: {exc}") from None
        return discover(config, containers)

    def guard_shrinkage(self, config: Config, job: str, backup_id: str) -> str | None:
        """Flag a new backup that is much smaller than the job's recent ones (backupd.shrinkage)."""
        from backupd.shrinkage import WINDOW, judge, judge_files

        retention = config.job_retention(job)
        share = retention.shrinkage if retention else 0.5
        backup = self.catalog.get(backup_id)
        reasons = [judge(backup.size, self.catalog.recent_sizes(job, backup.started_at, WINDOW), share)]
        counts = [a.file_count for a in backup.artifacts if a.file_count is not None]
        if counts:  # volume archives counted their members
            reasons.append(judge_files(sum(counts), self.catalog.recent_file_counts(job, backup.started_at, WINDOW),
                                       share))
        suspicion = "; ".join(r for r in reasons if r is not None) or None
        if suspicion is not None:
            self.catalog.set_suspicion(backup_id, suspicion)
            log.warning("backup %s of job %s is suspicious: %s; retention of the job deletes nothing until "
                        "it is accepted (backupd accept %s) or a later backup is normal", backup_id, job,
                        suspicion, backup_id, extra={"job": job, "backup_id": backup_id})
        return suspicion

    def prune(self, job: str, *, config: Config | None = None, stop: threading.Event | None = None,
              dry_run: bool = False) -> Any:
        """Apply retention to one job. A dry run reads the catalog only: no lease, no destination."""
        from backupd.prune import prune_job

        config = config or self.config
        if dry_run:
            return prune_job(config, self.catalog, job, self.clock(), {}, dry_run=True)
        with self.leases.hold([job_lease(job)], f"prune of job {job}", stop=stop, on_wait=_waiting_logger(job)):
            stores = self.stores(config.job_destinations(job))
            forget = self._snapshot_forgetter(config, job)
            try:
                return prune_job(config, self.catalog, job, self.clock(), stores, forget=forget)
            finally:
                for store in stores.values():
                    store.close()

    def compact(self, job: str, *, config: Config | None = None, stop: threading.Event | None = None) -> list[str]:
        """Repository mode: `restic prune` each of the job's repositories under the job's lease
        (never during its backups); bounded by restic's --max-unused. One line per repository."""
        from backupd.repository import compact_job

        config = config or self.config
        if config.jobs[job].format != "repository":
            return []
        with self.leases.hold([job_lease(job)], f"compaction of job {job}", stop=stop, on_wait=_waiting_logger(job)):
            stores = self.stores(config.job_destinations(job))
            try:
                return compact_job(config, self.host, job, stores)
            finally:
                for store in stores.values():
                    store.close()

    def _snapshot_forgetter(self, config: Config, job: str) -> Callable[[list[Any]], list[str]] | None:
        """For a repository job: how prune forgets the doomed backups' snapshots."""
        if config.jobs[job].format != "repository":
            return None
        from backupd.repository import forget_doomed

        return lambda doomed: forget_doomed(config, self.catalog, self.host, doomed)

    def verify_latest(self, job: str, *, config: Config | None = None,
                      stop: threading.Event | None = None) -> list[str]:
        """Check the newest successful backup of a job on every destination; return the problems."""
        from backupd.verify import verify_backup

        config = config or self.config
        backups = self.catalog.list(job=job, statuses=[SUCCEEDED])
        if not backups:
            return [f"job {job} has no successful backup to verify"]
        with self.leases.hold([job_lease(job)], f"verify of job {job}", stop=stop, on_wait=_waiting_logger(job)):
            stores = self.stores(config.job_destinations(job))
            from backupd.repository import snapshot_checker

            checks = verify_backup(config, self.catalog, stores, backups[0].id,
                                   check_snapshot=snapshot_checker(config, lambda: self.host))
        return [f"{c.artifact} on {c.destination}: {c.detail}" for c in checks if not c.ok]

    def end_helpers(self) -> int:
        """Remove this backupd's helper containers: cancelled runs blocked on one (a restic
        snapshot, a restore) then unwind, restarting what they stopped. Returns how many."""
        from docker.errors import DockerException
        from requests import RequestException

        if self._host is None:  # never connected: no helper of ours exists
            return 0
        try:
            return self._host.remove_helpers(lambda owner: owner == self.leases.me.id)
        except (DockerException, RequestException) as exc:  # an engine gone away raises the latter
            log.warning("could not end the helpers of cancelled runs: %s: %s", type(exc).__name__, exc)
            return 0

    def hold_for_restore(self, volume: str | None, container: str | None, wait: float | None = None,
                         job: str | None = None) -> Any:
        """The leases a restore needs: its target volume (and the containers a --force restore
        stops), or the job and database container a dump is fed back through."""
        resources = [job_lease(job)] if job else []
        if volume is not None:
            resources.append(f"volume:{volume}")
            resources += [f"container:{c.name}" for c in self.host.running_containers_using(volume)]
        if container is not None:
            resources.append(f"container:{container}")
        return self.leases.hold(resources, "restore", wait=wait, on_wait=_waiting_logger(None))


def _waiting_logger(job: str | None) -> Callable[[Conflict], None]:
    def waiting(conflict: Conflict) -> None:
        log.info("waiting: %s", conflict, extra={"job": job} if job else {})

    return waiting

