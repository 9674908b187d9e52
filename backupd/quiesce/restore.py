"""restore --database: stream a dump back into a database container."""

from __future__ import annotations

import logging

from backupd.artifact import read_copy
from backupd.catalog import Catalog
from backupd.config import Config, DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.errors import ConfigError
from backupd.quiesce.databases import connect, parse_source, restore_dump
from backupd.repository import is_snapshot, proven_input
from backupd.restore import configured_stores, find_good_copy, preference

log = logging.getLogger(__name__)


def _spec_for(config: Config, job: str, artifact: str, kind: str, server: str) -> DatabaseSpec:
    """The config entry that made the artifact (for user and password), or defaults."""
    job_cfg = config.jobs.get(job)
    for spec in job_cfg.databases if job_cfg else []:
        if artifact == spec.name or artifact.startswith(spec.name + "."):
            return spec
    container = None if ":" in server else server
    return DatabaseSpec(name=artifact.split(".")[0], type=kind, container=container,
                        host=server.split(":")[0] if container is None else None)


def restore_database(
    *,
    config: Config,
    catalog: Catalog,
    host: DockerHost,
    backup_id: str,
    name: str,
    to_container: str | None = None,
    force: bool = False,
    identity: str | None = None,
) -> str:
    """Restore dump `name` of a backup into its container (or `to_container`); returns where."""
    backup = catalog.get(backup_id)
    artifact = backup.artifact("database", name)
    source = parse_source(artifact.source)
    spec = _spec_for(config, backup.job, name, source.kind, source.server)
    if to_container is None and spec.container is None and spec.host is None:
        raise ConfigError(f"'{name}' came from {source.server}; pass --to-container C")
    where = f"restore {name}"
    target = connect(spec, host, where, container=to_container)
    if is_snapshot(artifact):
        # restic proves every blob as it reads; a snapshot is read back whole once before use.
        chunks = proven_input(config=config, host=host, job=backup.job, backup_id=backup_id, artifact=artifact)
        log.info("restoring dump %s of backup %s from its snapshot into %s", name, backup_id, target.runner.where)
        restore_dump(target, source, chunks, force, where)
        return target.runner.where
    stores = configured_stores(config)
    store, copy, blocks = find_good_copy(backup, artifact, stores, preference(config, backup.job),
                                         identity, check_tar=False, known=catalog.blocks(artifact.id))
    log.info("restoring dump %s of backup %s (copy on %s) into %s", name, backup_id,
             copy.destination, target.runner.where)
    # Proven whole above; proven again block by block as it is fed (the copy may have changed since).
    chunks = read_copy(store, copy, artifact, identity, blocks)
    restore_dump(target, source, chunks, force, where)
    return target.runner.where
