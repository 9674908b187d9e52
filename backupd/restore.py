"""Restore: pick a good copy, prove it, then unpack it into a volume.

Nothing unproven is written, or even parsed. Each block of a copy is checked
against the SHA-256 the catalog recorded for that block before it is
decrypted, decompressed and streamed into a helper container's tar, through a
guard that refuses any unsafe member before tar sees it; so a copy is read
once. A copy that fails midway is undone (the new or empty target is left as
it was) and the next destination holding one is tried. A backup the catalog
holds no block digests for (stored before them) gets a first read that proves
the whole copy and computes its block digests, against which the read that
writes is then proven block by block. Targets holding data that --force will
replace get a first pass that also decompresses and checks every member, so
nothing is emptied for an archive that cannot be restored. An existing
non-empty volume is only overwritten with --force, and then its running
containers are stopped first and started again after, whatever happens.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from backupd.artifact import ordered_copies, proven_blocks, read_copy, stored_chunks
from backupd.catalog import ArtifactView, BackupView, Catalog, CopyView
from backupd.config import Config
from backupd.docker_host import DockerHost, HelperError
from backupd.quiesce.stop import held
from backupd.errors import BackupdError, ConfigError, IntegrityError, RefusedError, UnsafeArchiveError
from backupd.storage import Store, configured_stores
from backupd.stream import Progress
from backupd.tarsafety import guarded

log = logging.getLogger(__name__)


def preference(config: Config, job: str) -> list[str]:
    """The job's own destinations first, in config order."""
    job_cfg = config.jobs.get(job)
    return list(job_cfg.destinations or config.destinations) if job_cfg else list(config.destinations)


def _candidates(artifact: ArtifactView, stores: dict[str, Store], prefer: list[str],
                problems: list[str]) -> Iterator[tuple[Store, CopyView]]:
    """Stored copies whose destination is configured, in preference order."""
    for copy in ordered_copies(artifact, prefer):
        store = stores.get(copy.destination)
        if store is None:
            problems.append(f"{copy.destination}: not in the current config")
            continue
        yield store, copy


def _skip_copy(copy: CopyView, exc: BackupdError, problems: list[str]) -> None:
    """Note why a copy is unusable, or raise when no other copy can do better."""
    if isinstance(exc, (HelperError, UnsafeArchiveError)):
        raise exc  # the target's fault, or the same bytes on every copy (same sha256)
    problems.append(str(exc) if isinstance(exc, IntegrityError) else f"{copy.destination}: {exc}")
    log.warning("copy on %s unusable: %s", copy.destination, exc)


def _no_good_copy(backup: BackupView, artifact: ArtifactView, problems: list[str]) -> BackupdError:
    detail = "; ".join(problems) or "no stored copy is recorded"
    return BackupdError(f"backup {backup.id}: no good copy of {artifact.kind} '{artifact.name}': {detail}")


def find_good_copy(
    backup: BackupView,
    artifact: ArtifactView,
    stores: dict[str, Store],
    prefer: list[str],
    identity: str | None,
    check_tar: bool,
    known: tuple[int, bytes] | None,
) -> tuple[Store, CopyView, tuple[int, bytes]]:
    """First copy (in preference order) whose bytes match the catalog, with the block
    digests (the catalog's `known` ones, or computed while proving it) that a later
    read of it must match block by block.

    With check_tar, the copy is also decrypted, decompressed and every member checked,
    each block proven before it is parsed.
    """
    problems: list[str] = []
    for store, copy in _candidates(artifact, stores, prefer, problems):
        try:
            blocks = proven_blocks(store, copy, artifact, known)
            if check_tar:
                for _ in guarded(read_copy(store, copy, artifact, identity, blocks)):
                    pass
            elif known is not None:
                for _ in stored_chunks(store, copy, blocks):
                    pass
            return store, copy, blocks
        except BackupdError as exc:
            _skip_copy(copy, exc, problems)
    raise _no_good_copy(backup, artifact, problems)


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
    from backupd.repository import is_snapshot, restore_snapshot

    if is_snapshot(artifact):
        return restore_snapshot(config=config, catalog=catalog, host=host, backup_id=backup_id,
                                artifact=artifact, target=target, force=force)
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
    prefer = preference(config, backup.job)
    known = catalog.blocks(artifact.id)

    def extract(store: Store, copy: CopyView, blocks: tuple[int, bytes]) -> None:
        log.info("restoring %s from backup %s (copy on %s) into volume %s",
                 volume, backup_id, copy.destination, target)
        progress = Progress(f"restore {volume}")
        chunks = read_copy(store, copy, artifact, identity, blocks)
        host.tar_extract(target, guarded(_counted(chunks, progress)), purpose=f"volume '{target}'")
        progress.done()

    if not empty:
        # Replacing data: prove every member first, so nothing is emptied for a bad archive.
        store, copy, blocks = find_good_copy(backup, artifact, stores, prefer, identity, check_tar=True, known=known)
        with held(catalog, backup_id, users) as restart_problems:
            host.clear_volume(target)
            extract(store, copy, blocks)  # proven again as written: the copy may have changed since
        if restart_problems:
            raise BackupdError("; ".join(restart_problems))
    else:
        # Each block is proven before it is written: with the catalog's block digests the
        # copy is read once; without, a first read proves it whole and computes them. A copy
        # that fails midway is undone (the target is empty again) and the next one is tried.
        problems: list[str] = []
        for store, copy in _candidates(artifact, stores, prefer, problems):
            try:
                blocks = proven_blocks(store, copy, artifact, known)
                _into_empty(host, target, exists, lambda: extract(store, copy, blocks))
                break
            except BackupdError as exc:
                _skip_copy(copy, exc, problems)
        else:
            raise _no_good_copy(backup, artifact, problems)
    log.info("restored %s into volume %s", volume, target)
    return target


def _into_empty(host: DockerHost, target: str, exists: bool, extract: Callable[[], None]) -> None:
    """Extract into a new or empty volume; on any failure, leave no trace of the attempt."""
    if not exists:
        host.create_volume(target)
    try:
        extract()
    except BaseException:
        if exists:
            host.clear_volume(target)  # it was empty: leave it empty, not half-filled
        else:
            host.remove_volume(target)  # a half-restored new volume would look whole
        raise


def _counted(chunks: Iterator[bytes], progress: Progress) -> Iterator[bytes]:
    for chunk in chunks:
        progress.update(len(chunk))
        yield chunk
