"""One backup run, from plan to record: the only place that sequences the steps.

Order, each step logged: resolve everything first (unknown names fail before
anything is touched); then before-hooks, database dumps, stop containers,
archive volumes, start containers, after-hooks (always, even after a
failure); then record the outcome and write a manifest beside the archives
so the catalog can be rebuilt from any destination.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from backupd.artifact import Cancelled, check_cancel, store_artifact
from backupd.quiesce.databases import Dump, check_unique, plan_dumps
from backupd.quiesce.hooks import run_hooks
from backupd.quiesce.stop import held, resolve_containers
from backupd.catalog import FAILED, STORED, SUCCEEDED, BackupView, Catalog, utcnow
from backupd.config import Config
from backupd.docker_host import DockerHost, VolumeSource
from backupd.redaction import redact_all
from backupd.storage import Store, open_store
from backupd.manifest import manifest_key, manifest_of

log = logging.getLogger(__name__)



@dataclass
class Plan:
    """Everything a run will touch, resolved before it starts."""

    job: str
    volumes: list[VolumeSource]
    stores: dict[str, Store]
    dumps: list[Dump] = field(default_factory=list)
    stop: list[Any] = field(default_factory=list)  # running containers to stop, in stop order


@dataclass
class RunResult:
    backup_id: str
    status: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # `on_error: continue` hooks that failed


def make_plan(config: Config, job_name: str, host: DockerHost) -> Plan:
    """Resolve names and open destinations; raises before any side effect."""
    job = config.job(job_name)
    volumes = host.resolve_volumes(job_name, list(job.volumes), job.exclude)
    if volumes and job.format != "repository":  # restic's helper reads a repository job's volumes
        host.check_helper_image()
        host.fifo_dir()  # an unsafe named-pipe directory fails the plan, not each volume
    dumps = [d for i, spec in enumerate(job.databases)
             for d in plan_dumps(spec, host, f"jobs.{job_name}.databases[{i}]")]
    check_unique(dumps, f"jobs.{job_name}.databases")
    stop = resolve_containers(host, job_name, list(job.stop_containers))
    if job.format == "repository" and (volumes or dumps):
        from backupd.repository import Restic

        Restic(host, config).check_image()
    stores = {name: open_store(name, spec) for name, spec in config.job_destinations(job_name).items()}
    return Plan(job_name, volumes, stores, dumps, stop)


def run_backup(
    config: Config,
    plan: Plan,
    catalog: Catalog,
    host: DockerHost,
    cancel: threading.Event | None = None,
    on_start: Callable[[str], None] | None = None,
    clock: Callable[[], datetime] = utcnow,
    owner: str | None = None,
) -> RunResult:
    """Run one planned backup and record it; never raises for a failed artifact.

    `owner` is the catalog owner id of this backupd (for recovery if it dies mid-run).
    """
    job_name = plan.job
    backup_id = catalog.start_backup(job_name, clock(), owner)
    if on_start is not None:
        on_start(backup_id)
    logger = logging.LoggerAdapter(log, {"backup_id": backup_id, "job": job_name})
    logger.info("backup %s of job %s started: %d volume(s) to %s", backup_id, job_name,
                len(plan.volumes), ", ".join(plan.stores))
    compression = config.job_compression(job_name)
    encryption = config.job_encryption(job_name)
    hooks = config.jobs[job_name].hooks
    where = f"jobs.{job_name}"
    repository = config.jobs[job_name].format == "repository"

    def store(kind: str, name: str, source: str, opener: Any, excludes: tuple[str, ...] = ()) -> None:
        try:
            store_artifact(catalog=catalog, backup_id=backup_id, job=job_name, kind=kind, name=name,
                           source=source, open_source=opener, stores=plan.stores,
                           compression=compression, encryption=encryption, cancel=cancel,
                           check_tar=kind == "volume",  # judged now as restore will judge it
                           excludes=excludes)
        except Cancelled:
            raise
        except Exception:  # noqa: BLE001 - recorded on the artifact; go on with the others
            pass

    def stream_snapshot(snapshots: Any, kind: str, name: str, source: str, opener: Any) -> None:
        try:
            snapshots.stream(catalog, backup_id, kind, name, source, opener, cancel)
        except Cancelled:
            raise
        except Exception:  # noqa: BLE001 - recorded on the artifact; go on with the others
            pass

    errors: list[str] = []
    warnings: list[str] = []
    snapshots = None
    try:
        logger.info("step 1/6: before hooks (%d)", len(hooks.before))
        warnings += run_hooks(hooks.before, "before", host, where)
        if repository:  # repositories opened (and created) before anything stops
            from backupd.repository import SnapshotWriter

            snapshots = SnapshotWriter(config, host, job_name, plan.stores)
        logger.info("step 2/6: database dumps (%d)", len(plan.dumps))
        for dump in plan.dumps:
            check_cancel(cancel, f"database '{dump.artifact}'")
            if snapshots is not None:
                stream_snapshot(snapshots, "database", dump.artifact, dump.source, dump.open)
            else:
                store("database", dump.artifact, dump.source, dump.open)
        logger.info("step 3/6: stop containers (%s)", ", ".join(c.name for c in plan.stop) or "none")
        # Only the volume copy happens while they are stopped: dumps came before, manifests and
        # after-hooks come after. (The copy itself streams to the destinations: nothing is staged.)
        stopped_at = time.monotonic()
        try:
            with held(catalog, backup_id, plan.stop, owner,
                      host.engine_id() if plan.stop else None) as restart_problems:
                logger.info("step 4/6: %s volumes (%d)", "snapshot" if repository else "archive",
                            len(plan.volumes))
                for src in plan.volumes:
                    check_cancel(cancel, f"volume '{src.name}'")
                    if snapshots is not None:
                        snapshots.snapshot(catalog, backup_id, src)
                    else:
                        store("volume", src.name, f"{src.kind}:{src.source}", lambda src=src: host.tar_stream(src),
                              src.exclude)
                logger.info("step 5/6: start containers")
        finally:
            if plan.stop:
                downtime = time.monotonic() - stopped_at
                catalog.set_downtime(backup_id, downtime)
                logger.info("containers were stopped for %.1f s", downtime)
        errors += restart_problems
        if snapshots is not None:  # the volumes are read: copies to the other repositories need no downtime
            check_cancel(cancel, "copies to the other repositories")
            snapshots.finish(catalog, backup_id)
    except BaseException as exc:  # before-hook failure, cancel, Ctrl-C: after-hooks still run
        errors.append(str(exc) or type(exc).__name__)
        if snapshots is not None:
            snapshots.abandon(catalog, str(exc) or type(exc).__name__)
        if not isinstance(exc, Exception):
            _after_hooks(hooks.after, host, where, errors, warnings, logger)
            catalog.add_warnings(backup_id, warnings)
            catalog.finish_backup(backup_id, f"interrupted: {type(exc).__name__}")
            raise
    _after_hooks(hooks.after, host, where, errors, warnings, logger)
    catalog.add_warnings(backup_id, warnings)
    run_error = "; ".join(errors) or None
    status = catalog.finish_backup(backup_id, run_error)
    backup = catalog.get(backup_id)
    if status != FAILED and not repository:  # a repository's snapshots describe themselves
        write_manifests(backup, plan.stores,
                        {a.id: known for a in backup.artifacts if (known := catalog.blocks(a.id)) is not None})
    for opened in plan.stores.values():
        opened.close()
    errors = [backup.error] if backup.error else []
    log_fn = logger.info if status == SUCCEEDED else logger.error
    log_fn("backup %s of job %s %s (%d bytes)%s", backup_id, job_name, status, backup.size,
           f": {backup.error}" if backup.error else "")
    return RunResult(backup_id, status, errors, warnings)


def _after_hooks(hooks: list, host: DockerHost, where: str, errors: list[str], warnings: list[str],
                 logger: Any) -> None:
    logger.info("step 6/6: after hooks (%d)", len(hooks))
    try:
        warnings += run_hooks(hooks, "after", host, where)
    except Exception as exc:  # noqa: BLE001 - recorded with the run
        errors.append(str(exc))


def write_manifests(backup: BackupView, stores: dict[str, Store],
                    blocks: Mapping[int, tuple[int, bytes]] | None = None) -> None:
    """Put a manifest beside the archives on each destination that holds any of them,
    with the block digests in `blocks` (by artifact id)."""
    # Plaintext beside archives that may be encrypted: masked like everything that leaves backupd.
    data = json.dumps(redact_all(manifest_of(backup, blocks)), indent=2).encode()
    key = manifest_key(backup.job, backup.id)
    for dest, store in stores.items():
        if not any(c.destination == dest and c.status == STORED for a in backup.artifacts for c in a.copies):
            continue
        try:
            upload = store.open_upload(key)
            upload.write(data)
            upload.commit()
        except Exception as exc:  # noqa: BLE001 - the archives are safe; only rebuild suffers
            log.warning("could not write %s to %s: %s", key, dest, exc)
