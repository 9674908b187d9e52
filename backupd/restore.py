"""Restore: pick a good copy, prove it, then unpack it into a volume.

Two passes over the copy: the first checks size, SHA-256 and that every tar
member is safe *before anything is written*; the second streams it into a
helper container that extracts it. A copy that fails the first pass is skipped
for the next destination that holds one. An existing non-empty volume is only
overwritten with --force, and then its running containers are stopped first
and started again after, whatever happens.
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

from backupd.artifact import ordered_copies, read_copy
from backupd.catalog import ArtifactView, BackupView, Catalog, CopyView
from backupd.config import Config
from backupd.docker_host import DockerHost, stop_and_start
from backupd.errors import BackupdError, ConfigError, IntegrityError, RefusedError
from backupd.storage import Store, open_store
from backupd.stream import IterReader, Progress
from backupd.tarsafety import check_tar_stream

log = logging.getLogger(__name__)


def configured_stores(config: Config) -> dict[str, Store]:
    return {name: open_store(name, spec) for name, spec in config.destinations.items()}


def preference(config: Config, job: str) -> list[str]:
    """The job's own destinations first, in config order."""
    job_cfg = config.jobs.get(job)
    return list(job_cfg.destinations or config.destinations) if job_cfg else list(config.destinations)


def find_good_copy(
    backup: BackupView,
    artifact: ArtifactView,
    stores: dict[str, Store],
    prefer: list[str],
    identity: str | None,
    check_tar: bool,
) -> tuple[Store, CopyView]:
    """First copy (in preference order) whose bytes match the catalog and whose tar is safe."""
    problems = []
    for copy in ordered_copies(artifact, prefer):
        store = stores.get(copy.destination)
        if store is None:
            problems.append(f"{copy.destination}: not in the current config")
            continue
        try:
            reader = IterReader(read_copy(store, copy, artifact, identity))
            if check_tar:
                check_tar_stream(io.BufferedReader(reader, 1 << 20))
            reader.drain()
            return store, copy
        except IntegrityError as exc:
            if "unsafe archive" in str(exc):
                raise  # the same bytes are on every copy (same sha256): no point trying others
            problems.append(str(exc))
            log.warning("skipping copy: %s", exc)
        except BackupdError as exc:
            problems.append(f"{copy.destination}: {exc}")
            log.warning("copy on %s unusable: %s", copy.destination, exc)
    detail = "; ".join(problems) or "no stored copy is recorded"
    raise BackupdError(f"backup {backup.id}: no good copy of {artifact.kind} '{artifact.name}': {detail}")


def restore_volume(
    *,
    config: Config,
    catalog: Catalog,
    host: DockerHost,
    backup_id: str,
    volume: str,
    to_volume: str | None = None,
    force: bool = False,
    identity: str | None = None,
) -> str:
    """Restore the archive of `volume` from a backup; returns the volume written."""
    backup = catalog.get(backup_id)
    artifact = backup.artifact("volume", volume)
    kind, _, source = artifact.source.partition(":")
    target = to_volume or (source if kind == "volume" else None)
    if target is None:
        raise ConfigError(f"'{volume}' was backed up from host path {source}; pass --to-volume NAME")
    host.check_helper_image()
    # Decide about the target first: refusing is cheap, verifying a copy is not.
    exists = host.volume_exists(target)
    users: list = []
    if exists and not host.volume_is_empty(target):
        if not force:
            raise RefusedError(
                f"volume '{target}' is not empty; restore to a new volume with --to-volume NAME, "
                "or pass --force to replace its contents (its containers are stopped meanwhile)")
        users = host.running_containers_using(target)
    stores = configured_stores(config)
    store, copy = find_good_copy(backup, artifact, stores, preference(config, backup.job),
                                 identity, check_tar=True)
    log.info("restoring %s from backup %s (copy on %s) into volume %s",
             volume, backup_id, copy.destination, target)

    def extract() -> None:
        progress = Progress(f"restore {volume}")
        host.tar_extract(target, _counted(read_copy(store, copy, artifact, identity), progress),
                         purpose=f"volume '{target}'")
        progress.done()

    if not exists:
        host.create_volume(target)
        try:
            extract()
        except BaseException:
            host.remove_volume(target)  # a half-restored new volume would look whole
            raise
    elif force:

        def replace() -> None:
            host.clear_volume(target)
            extract()

        stop_and_start(users, replace)
    else:
        extract()
    log.info("restored %s into volume %s", volume, target)
    return target


def _counted(chunks: Iterator[bytes], progress: Progress) -> Iterator[bytes]:
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk
