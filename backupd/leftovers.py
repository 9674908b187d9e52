"""Leftovers of interrupted uploads: which may go, and removing them.

A backupd killed mid-upload (SIGKILL, a crash, the host going down) cannot
abort its uploads: hidden `.partial-` files stay on local and SFTP
destinations, multipart uploads stay open on S3, and nothing lists them.
Start-up recovery and `prune --orphans` sweep them with one rule.

Every leftover sits under its backup's `<job>/<backup id>/`, and the catalog
row of a backup exists before its first upload opens. So a leftover's owner
is known by id: the leftover of a backup still running under a live backupd
is kept; of any other backup this catalog knows, it is removed, unless its job is still held by a live
backupd: a run writes its manifest after it is recorded finished, under the
job's lease, so the manifest's upload is not a leftover. A backup id
this catalog does not know (another catalog, a catalog rebuilt since) is
judged by time: removed only if it was last written before the oldest live
run started. The catalog is read after the stores are listed, so a run that
starts in between cannot lose its upload.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Collection

from backupd.catalog import BACKUP_ID_RE, Catalog
from backupd.storage.base import Leftover, Store
from backupd.stream import human_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    destination: str
    leftover: Leftover
    keep: str | None = None  # why it stays; None: it goes

    def describe(self) -> str:
        what = "open multipart upload" if self.leftover.upload_id else "partial file"
        return f"{self.destination}: {self.leftover.key} ({what}, {human_bytes(self.leftover.size)})"


@dataclass
class LeftoverReport:
    found: list[Found] = field(default_factory=list)
    removed: list[Found] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "destination: why"

    @property
    def removed_bytes(self) -> int:
        return sum(f.leftover.size for f in self.removed)


def backup_of(key: str) -> str | None:
    """The backup id a leftover's key names, or None outside backupd's <job>/<backup id>/ layout."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and BACKUP_ID_RE.fullmatch(parts[1]) else None


def why_kept(leftover: Leftover, live: dict[str, datetime], known: set[str],
             busy_jobs: Collection[str] = ()) -> str | None:
    """Why this leftover must stay, or None if no live run can own it.

    `live`: id -> start of every backup a live backupd is running; `known`: every
    backup id of the leftovers that the catalog has a row for; `busy_jobs`: jobs
    whose lease a live backupd holds.
    """
    backup_id = backup_of(leftover.key)
    if backup_id is None:
        return "not in backupd's <job>/<backup id>/ layout"
    if backup_id in live:
        return f"backup {backup_id} is still running"
    job = leftover.key.split("/", 1)[0]
    if job in busy_jobs:
        return f"job {job} is held by a running backupd (its run may still be writing a manifest)"
    if backup_id in known:
        return None
    oldest = min(live.values(), default=None)
    if oldest is None:
        return None
    if leftover.modified is None or leftover.modified >= oldest:
        return (f"backup {backup_id} is not in this catalog, and the upload is not older than "
                f"the oldest running backup")
    return None


def sweep_leftovers(catalog: Catalog, stores: dict[str, Store], owner_alive: Callable[[str | None], bool],
                    dry_run: bool = False, busy_jobs: Callable[[], Collection[str]] = frozenset) -> LeftoverReport:
    """List every store's leftovers, and remove those no live run owns (unless dry_run).

    A store that cannot be listed or cleaned is reported in `failures`, never raised:
    the others are still swept, and the next sweep tries again.
    """
    report = LeftoverReport()
    listed: dict[str, list[Leftover]] = {}
    for dest, store in stores.items():
        try:
            listed[dest] = list(store.leftovers())
        except Exception as exc:  # noqa: BLE001 - one destination must not stop the others
            report.failures.append(f"{dest}: cannot list leftovers: {exc}")
    # Only now the catalog: every leftover listed above had its backup's row before it existed.
    live = {backup_id: started for backup_id, owner, started in catalog.running()
            if owner is None or owner_alive(owner)}  # rows from before owners were recorded: kept
    ids = {backup_of(lo.key) for items in listed.values() for lo in items}
    known = catalog.known(i for i in ids if i is not None)
    busy = busy_jobs()
    for dest, items in listed.items():
        for leftover in items:
            found = Found(dest, leftover, why_kept(leftover, live, known, busy))
            report.found.append(found)
            if found.keep is not None or dry_run:
                continue
            try:
                stores[dest].remove_leftover(leftover)
            except Exception as exc:  # noqa: BLE001 - reported; the next sweep tries again
                report.failures.append(f"{dest}: cannot remove {leftover.key}: {exc}")
                continue
            report.removed.append(found)
            log.info("removed the leftover of an interrupted upload: %s", found.describe())
    return report
