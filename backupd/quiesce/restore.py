"""restore --database: stream a dump back into a database container."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from backupd.artifact import read_copy
from backupd.catalog import Catalog
from backupd.config import Config, DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.errors import ConfigError
from backupd.quiesce.databases import WHOLE, connect, entry_of, made_by, parse_source, restore_dump
from backupd.quiesce.file_restore import restore_file
from backupd.repository import is_snapshot, proven_input
from backupd.restore import configured_stores, find_good_copy, preference

log = logging.getLogger(__name__)


def _spec_for(config: Config, job: str, artifact: str, kind: str, server: str) -> DatabaseSpec:
    """The config entry that made the artifact (for user and password), or defaults."""
    job_cfg = config.jobs.get(job)
    for spec in job_cfg.databases if job_cfg else []:
        if made_by(artifact, spec.name):
            return spec
    container = None if ":" in server else server
    # (for SQLite, the file's path is in the artifact's source; this is only a placeholder)
    return DatabaseSpec(name=entry_of(artifact), type=kind, container=container,
                        host=server.split(":")[0] if container is None else None,
                        path="/restore.db" if kind == "sqlite" else None)


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
    stores = configured_stores(config)

    def proven() -> Callable[[], Iterator[bytes]]:
        """Prove a copy (archive mode) or a snapshot (repository mode) whole before anything
        is touched; return how to read it."""
        if is_snapshot(artifact):  # restic proves every blob as it reads it back whole once
            chunks = proven_input(config=config, host=host, job=backup.job, backup_id=backup_id, artifact=artifact)
            return lambda: chunks
        store, copy, blocks = find_good_copy(backup, artifact, stores, preference(config, backup.job),
                                             identity, check_tar=False, known=catalog.blocks(artifact.id))
        log.info("dump %s of backup %s: the copy on %s reads back whole", name, backup_id, copy.destination)
        # Proven whole here; proven again block by block as it is fed (the copy may have changed since).
        return lambda: read_copy(store, copy, artifact, identity, blocks)

    if source.kind in WHOLE:  # a file the server holds open: put back with its container stopped
        found: list[Callable[[], Iterator[bytes]]] = []
        return restore_file(spec=spec, source=source, host=host, catalog=catalog, backup_id=backup_id,
                            container=to_container, force=force, where=where,
                            prove=lambda: found.append(proven()), chunks=lambda: found[0]())
    target = connect(spec, host, where, container=to_container)
    chunks = proven()()
    log.info("restoring dump %s of backup %s into %s", name, backup_id, target.runner.where)
    restore_dump(target, source, chunks, force, where)
    return target.runner.where
