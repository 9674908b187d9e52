"""Prune: apply the retention decision to every destination, then to the catalog.

Order matters for truth: each copy is deleted from its store first and only
then marked deleted; a backup is marked deleted only when none of its copies
remains. A copy that cannot be deleted keeps its row (with the error) and is
retried next time. Also finds orphans (objects the catalog does not know,
copies whose object vanished) and rebuilds catalog rows from the manifests
stored beside the archives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable
from zoneinfo import ZoneInfo

from backupd.catalog import DELETED, MISSING, RUNNING, STORED, SUCCEEDED, SUSPICIOUS, BackupView, Catalog
from backupd.config import Config
from backupd.errors import ConfigError, NotFoundError, RefusedError
from backupd.gcpause import paused_gc
from backupd.manifest import (MAX_MANIFEST, BackupManifest, BadManifest, CopyEntry, in_own_directory, manifest_key,
                              read_manifest)
from backupd.retention import BackupRecord, Decision, Policy, decide
from backupd.storage import Store
from backupd.storage.base import MANIFEST, REPOSITORY_ROOT
from backupd.stream import read_chunks

log = logging.getLogger(__name__)


# Backups stamped this far ahead of the clock mean the clock was (or is) wrong: they would
# outrank every later backup, and retention would delete each new one as it is made.
CLOCK_SKEW_TOLERANCE = timedelta(minutes=10)


class ClockSkewError(RefusedError):
    """Retention refused: the newest backup lies in the future."""


@dataclass
class PruneReport:
    job: str
    decisions: list[Decision]
    deleted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "backup id: destination key: why"


def job_policy(config: Config, job: str) -> Policy:
    retention = config.job_retention(job)
    if retention is None:
        raise ConfigError(f"jobs.{job}.retention: no retention policy (set one per job or globally)")
    return Policy.from_config(retention)


def prune_job(
    config: Config,
    catalog: Catalog,
    job: str,
    now: datetime,
    stores: dict[str, Store],
    dry_run: bool = False,
    forget: Callable[[list[BackupView]], list[str]] | None = None,
) -> PruneReport:
    """Decide from the catalog, then delete the doomed backups everywhere (unless dry_run).

    `forget` (repository mode) removes the doomed backups' snapshots from their repositories
    first and returns its failures; their copies are then deleted already.
    """
    policy = job_policy(config, job)
    tz = ZoneInfo(config.jobs[job].timezone) if job in config.jobs else ZoneInfo("UTC")
    with paused_gc():
        records = [BackupRecord(b.id, b.started_at, b.status) for b in catalog.summaries(job=job)]
        report = PruneReport(job, decide(records, policy, now, tz))
    if dry_run:
        return report
    check_clock(job, records, now)
    check_shrinkage(catalog, job, records)
    if forget is not None:
        doomed = [catalog.get(d.id) for d in report.decisions if not d.keep]
        report.failures += forget(doomed) if doomed else []
    for decision in report.decisions:
        if not decision.keep:
            delete_backup(catalog, catalog.get(decision.id), stores, report)
    log.info("pruned job %s: %d deleted, %d kept, %d deletion failures", job, len(report.deleted),
             sum(d.keep for d in report.decisions), len(report.failures), extra={"job": job})
    return report


def check_clock(job: str, records: list[BackupRecord], now: datetime) -> None:
    """Refuse to delete anything while the newest backup lies in the future beyond the tolerance."""
    if not records:
        return
    newest = max(records, key=lambda r: r.started_at)
    ahead = newest.started_at - now
    if ahead > CLOCK_SKEW_TOLERANCE:
        raise ClockSkewError(
            f"retention of job {job} refused: backup {newest.id} started at "
            f"{newest.started_at:%Y-%m-%d %H:%M:%S}Z, {ahead} ahead of this clock ({now:%Y-%m-%d %H:%M:%S}Z); "
            f"it would outrank every new backup. Fix the clock; once it has passed that time, or that "
            f"backup is deleted by hand, retention runs again")


def check_shrinkage(catalog: Catalog, job: str, records: list[BackupRecord]) -> None:
    """Refuse to delete anything while the job's newest completed backup is suspicious."""
    from backupd.shrinkage import SuspiciousShrinkError

    newest = next((r for r in records if r.status in (SUCCEEDED, SUSPICIOUS)), None)  # newest first
    if newest is not None and newest.status == SUSPICIOUS:
        raise SuspiciousShrinkError(
            f"retention of job {job} refused: its newest backup {newest.id} is suspicious "
            f"({catalog.get(newest.id).suspicion}); if that is right, run `backupd accept {newest.id}`; "
            f"a later backup of normal size lifts this too")


def delete_backup(catalog: Catalog, backup: BackupView, stores: dict[str, Store], report: PruneReport) -> None:
    """Delete every copy (and manifest); mark the backup deleted only if nothing is left."""
    remaining = 0
    manifests: set[tuple[str, str]] = set()
    for art in backup.artifacts:
        for copy in art.copies:
            if copy.status == DELETED:
                continue
            if copy.snapshot_id:  # a snapshot still in its repository: only `forget` removes it
                remaining += 1
                continue
            store = stores.get(copy.destination)
            if store is None:
                remaining += 1
                report.failures.append(f"{backup.id}: {copy.destination} {copy.key}: destination not in config")
                continue
            try:
                store.delete(copy.key)
            except Exception as exc:  # noqa: BLE001 - recorded, retried next prune
                remaining += 1
                catalog.set_copy_status(backup.id, copy.destination, copy.key, copy.status, f"delete failed: {exc}")
                report.failures.append(f"{backup.id}: {copy.destination} {copy.key}: {exc}")
                continue
            catalog.set_copy_status(backup.id, copy.destination, copy.key, DELETED)
            manifests.add((copy.destination, manifest_key(backup.job, backup.id)))
    for dest, key in sorted(manifests):
        try:
            stores[dest].delete(key)
        except Exception as exc:  # noqa: BLE001 - only rebuild suffers from a stray manifest
            remaining += 1
            report.failures.append(f"{backup.id}: {dest} {key}: {exc}")
    if remaining == 0:
        catalog.mark_deleted(backup.id)
        report.deleted.append(backup.id)


# ------------------------------------------------------------------ orphans


@dataclass
class OrphanReport:
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (destination, key)
    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (backup id, destination, key)
    removed: list[tuple[str, str]] = field(default_factory=list)


def find_orphans(catalog: Catalog, stores: dict[str, Store], delete: bool = False,
                 dry_run: bool = False) -> OrphanReport:
    """Objects under backupd's layout the catalog does not know (deleted if `delete`), and copies
    whose object vanished (marked missing). A dry run deletes and marks nothing."""
    report = OrphanReport()
    backups = {b.id: b for b in catalog.list(include_deleted=True)}
    for dest, store in stores.items():
        live: dict[str, tuple[str, str]] = {}  # key -> (backup id, status)
        for b in backups.values():
            for art in b.artifacts:
                for copy in art.copies:
                    if copy.destination == dest:
                        live[copy.key] = (b.id, copy.status)
        present = set()
        for obj in store.list():
            parts = obj.key.split("/")
            if len(parts) != 3 or parts[0] == REPOSITORY_ROOT:
                continue  # not backupd's <job>/<backup id>/<file> layout: not ours to judge
            job, backup_id, name = parts
            present.add(obj.key)
            backup = backups.get(backup_id)
            if backup is not None and backup.status == RUNNING:
                continue  # a run in progress owns it
            if name == MANIFEST and backup is not None and backup.deleted_at is None:
                continue
            if obj.key in live and live[obj.key][1] not in (DELETED,):
                continue
            report.orphans.append((dest, obj.key))
            if delete and not dry_run:
                store.delete(obj.key)
                report.removed.append((dest, obj.key))
        for key, (backup_id, status) in live.items():
            if status == STORED and key not in present:
                if not dry_run:
                    catalog.set_copy_status(backup_id, dest, key, MISSING, "object vanished from the destination")
                report.missing.append((backup_id, dest, key))
    return report


# ------------------------------------------------------------------ rebuild


def rebuild_catalog(catalog: Catalog, destination: str, store: Store) -> tuple[list[str], list[str]]:
    """Re-create catalog rows from the manifests on one destination.

    Returns (imported ids, skipped ids: already in the catalog). A manifest is
    trusted no more than it must be: it vouches only for copies on the
    destination it was read from, in its own backup's directory, and each is
    recorded stored only if its object is there with the recorded size (else
    missing). Copies it claims on other destinations are not imported, so a
    forged manifest cannot make a later prune delete another destination's
    archives; rebuilding from each destination adds its copies to the backups
    already imported. A manifest that is malformed, or claims objects outside its
    directory, is skipped with a warning naming it, and the rebuild goes on.
    """
    imported, skipped = [], []
    for obj in store.list():
        if obj.key.rpartition("/")[2] != MANIFEST:
            continue
        try:
            record = read_manifest(_read_whole(store, obj.key), obj.key)
            copies = _vouched(record, destination, store)
        except (BadManifest, NotFoundError) as exc:
            log.warning("catalog rebuild: skipping manifest %s on %s: %s", obj.key, destination, exc)
            continue
        data = record.model_dump()
        for art, own in zip(data["artifacts"], copies):
            art["destinations"] = [c.model_dump() for c in own]
        blocks = [None if a.blocks is None else (a.blocks.size, a.blocks.digests()) for a in record.artifacts]
        if catalog.import_backup(data, blocks):
            imported.append(record.id)
        else:
            skipped.append(record.id)
            _add_copies(catalog, record, copies, destination)
    return imported, skipped


def _read_whole(store: Store, key: str) -> bytes:
    """An object's bytes, up to one past the most a manifest may hold."""
    raw = bytearray()
    with store.open_read(key) as fileobj:
        for chunk in read_chunks(fileobj):
            raw += chunk
            if len(raw) > MAX_MANIFEST:
                break
    return bytes(raw)


def _vouched(record: BackupManifest, destination: str, store: Store) -> list[list[CopyEntry]]:
    """Per artifact, the copies the manifest may vouch for: those on `destination`, each
    stored copy checked against its object there (exists, same size)."""
    per_artifact = []
    for art in record.artifacts:
        own = []
        for copy in art.destinations:
            if copy.destination != destination:
                continue  # another destination's word, not this one's
            if not in_own_directory(record, copy.key):
                raise BadManifest(f"it claims '{copy.key}', outside its backup's directory")
            if copy.status == STORED:
                try:
                    info = store.stat(copy.key)
                except ValueError as exc:  # a key the store refuses
                    raise BadManifest(str(exc)) from None
                ok = info is not None and info.size == art.size
                copy = copy.model_copy(update={
                    "status": STORED if ok else MISSING,
                    "error": None if ok else "not found with the recorded size during rebuild"})
            own.append(copy)
        per_artifact.append(own)
    if not any(per_artifact):
        raise BadManifest(f"it vouches for no copy on '{destination}'")
    return per_artifact


def _add_copies(catalog: Catalog, record: BackupManifest, copies: list[list[CopyEntry]],
                destination: str) -> None:
    """Add this destination's copies to a backup the catalog already holds, for the artifacts
    whose size and SHA-256 the catalog agrees with."""
    known = catalog.get(record.id)
    if known.deleted_at is not None:
        return
    rows = []
    for art, own in zip(record.artifacts, copies):
        match = [a for a in known.artifacts if (a.kind, a.name) == (art.kind, art.name)]
        if not match or (match[0].size, match[0].sha256) != (art.size, art.sha256):
            log.warning("catalog rebuild: the manifest of backup %s on %s disagrees with the catalog about "
                        "%s '%s': its copies there are not added", record.id, destination, art.kind, art.name)
            continue
        rows += [(art.kind, art.name, c.destination, c.key, c.status, c.error, None) for c in own]
    added = catalog.add_copies(record.id, rows)
    if added:
        log.info("catalog rebuild: added %d copies on %s to backup %s", added, destination, record.id)
