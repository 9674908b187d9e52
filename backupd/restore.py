"""Restore: pick a good copy, prove it, then unpack it into a volume.

Before anything is written, a first pass proves the copy's size and SHA-256
against the catalog (a copy that fails is skipped for the next destination
holding one). The second pass decompresses it and streams it into a helper
container's tar through a guard that refuses any unsafe member before tar
sees it. When the target holds data that --force will replace, the first pass
also decompresses and checks every member, so nothing is emptied for an
archive that cannot be restored. An existing non-empty volume is only
overwritten with --force, and then its running containers are stopped first
and started again after, whatever happens.
"""

from __future__ import annotations

import logging
from typing import Iterator

from backupd.artifact import ordered_copies, read_copy, stored_chunks
from backupd.catalog import ArtifactView, BackupView, Catalog, CopyView
from backupd.config import Config
from backupd.docker_host import DockerHost
from backupd.quiesce.stop import held
from backupd.errors import BackupdError, ConfigError, IntegrityError, RefusedError
from backupd.storage import Store, configured_stores
from backupd.stream import Progress
from backupd.tarsafety import guarded

log = logging.getLogger(__name__)


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
    """First copy (in preference order) whose bytes match the catalog.

    With check_tar, the copy is also decrypted, decompressed and every member checked.
    """
    problems = []
    for copy in ordered_copies(artifact, prefer):
        store = stores.get(copy.destination)
        if store is None:
            problems.append(f"{copy.destination}: not in the current config")
            continue
        try:
            if check_tar:
                for _ in guarded(read_copy(store, copy, artifact, identity)):
                    pass
            else:
                for _ in stored_chunks(store, copy, artifact):
                    pass
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
    empty = not exists or host.volume_is_empty(target)
    users: list = []
    if not empty:
        if not force:
            raise RefusedError(
                f"volume '{target}' is not empty; restore to a new volume with --to-volume NAME, "
                "or pass --force to replace its contents (its containers are stopped meanwhile)")
        users = host.running_containers_using(target)
    stores = configured_stores(config)
    # Replacing data: prove every member first, so nothing is emptied for a bad archive.
    store, copy = find_good_copy(backup, artifact, stores, preference(config, backup.job),
                                 identity, check_tar=not empty)
    log.info("restoring %s from backup %s (copy on %s) into volume %s",
             volume, backup_id, copy.destination, target)

    def extract() -> None:
        progress = Progress(f"restore {volume}")
        host.tar_extract(target, guarded(_counted(read_copy(store, copy, artifact, identity), progress)),
                         purpose=f"volume '{target}'")
        progress.done()

    if not exists:
        host.create_volume(target)
        try:
            extract()
        except BaseException:
            host.remove_volume(target)  # a half-restored new volume would look whole
            raise
    elif not empty:
        with held(catalog, backup_id, users) as restart_problems:
            host.clear_volume(target)
            extract()
        if restart_problems:
            raise BackupdError("; ".join(restart_problems))
    else:
        try:
            extract()
        except BaseException:
            host.clear_volume(target)  # it was empty: leave it empty, not half-filled
            raise
    log.info("restored %s into volume %s", volume, target)
    return target


def _counted(chunks: Iterator[bytes], progress: Progress) -> Iterator[bytes]:
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk
