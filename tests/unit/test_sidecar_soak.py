"""Months of schedules in a few seconds: the real Sidecar and APScheduler, the real App's prune
(leases, clock check, prune_job) against a real local destination, driven by a fake clock.
Only the volume copy is replaced: each backup writes a small archive of its own.

At the end, the backups left in the catalog and on disk must be exactly the ones the GFS
policy names, worked out here independently of backupd.retention.
"""

from __future__ import annotations

import hashlib
import threading
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from apscheduler.executors.debug import DebugExecutor

from backupd.app import App, BackupOutcome
from backupd.config import Config, parse_config
from backupd.run import write_manifests
from backupd.scheduler import Sidecar
from tests.unit.test_scheduler import Clock, ManualScheduler, clock  # noqa: F401 - fixture

UTC = timezone.utc
START = datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
DAYS = 200


class ArchiveWritingApp(App):
    """The real App, except that a backup writes a small archive instead of copying a volume."""

    made: dict[str, list[date]]

    def backup(self, job: str, *, config: Config | None = None, cancel: threading.Event | None = None,
               stop: threading.Event | None = None, on_start: Callable[[str], None] | None = None,
               wait: float | None = None) -> BackupOutcome:
        stores = self.stores(self.config.job_destinations(job))
        backup_id = self.catalog.start_backup(job, self.clock(), self.leases.register())
        data = f"archive of {job} at {self.clock().isoformat()}".encode()
        keys = {d: f"{job}/{backup_id}/volume-v.tar.zst" for d in stores}
        art = self.catalog.add_artifact(backup_id, "volume", "v", "volume:v", "zstd", None, keys)
        for dest, store in stores.items():
            upload = store.open_upload(keys[dest])
            upload.write(data)
            upload.commit()
        self.catalog.finish_artifact(art, len(data), hashlib.sha256(data).hexdigest(), {})
        status = self.catalog.finish_backup(backup_id)
        write_manifests(self.catalog.get(backup_id), stores)
        self.made.setdefault(job, []).append(self.clock().date())
        return BackupOutcome(job, backup_id, status, [])


def newest_per(days: list[date], key: Callable[[date], Any], count: int) -> set[date]:
    """The newest day in each of the `count` newest periods that hold a backup."""
    newest: dict[Any, date] = {}
    for d in sorted(days):
        newest[key(d)] = d
    return {newest[k] for k in sorted(newest)[-count:]}


def expected_days(days: list[date], daily: int, weekly: int, monthly: int) -> set[date]:
    return (newest_per(days, lambda d: d, daily)
            | newest_per(days, lambda d: d.isocalendar()[:2], weekly)
            | newest_per(days, lambda d: (d.year, d.month), monthly))


def test_months_of_daily_weekly_and_monthly_schedules_leave_exactly_what_gfs_keeps(
        clock: Clock, tmp_path: Path) -> None:
    policy = {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}
    config = parse_config({
        "catalog": f"sqlite:///{tmp_path / 'catalog.db'}",
        "destinations": {"local": {"type": "local", "path": str(tmp_path / "backups")}},
        "jobs": {
            # pruned right after each backup
            "daily": {"schedule": "0 3 * * *", "volumes": ["v"], "retention": policy},
            # pruned on a schedule of its own, on Mondays
            "weekly": {"schedule": "0 4 * * 0", "volumes": ["v"],
                       "retention": {"keep_weekly": 5, "keep_monthly": 3, "schedule": "0 6 * * 1"}},
            "monthly": {"schedule": "0 5 1 * *", "volumes": ["v"], "retention": {"keep_monthly": 4}},
        },
    }, env={})
    app = ArchiveWritingApp(config, "run", clock=clock)
    app.made = made = {}
    sidecar = Sidecar(config, app, app.catalog, clock=clock,
                      scheduler=ManualScheduler(timezone=UTC, executors={"default": DebugExecutor()}))
    clock.now = START
    sidecar.start()
    for day in range(DAYS):
        for hour in (3, 4, 5, 6):  # each schedule's hour, a minute past
            clock.now = START + timedelta(days=day, hours=hour, minutes=1)
            sidecar.scheduler.tick()  # type: ignore[attr-defined]
    sidecar.stop(grace=0)

    assert len(made["daily"]) == DAYS and len(made["monthly"]) == 7
    expected = {
        "daily": expected_days(made["daily"], 7, 4, 6),
        "weekly": newest_per(made["weekly"], lambda d: d.isocalendar()[:2], 5)
        | newest_per(made["weekly"], lambda d: (d.year, d.month), 3),
        "monthly": newest_per(made["monthly"], lambda d: (d.year, d.month), 4),
    }
    last_monday = max(d for d in made["weekly"]) + timedelta(days=1)
    assert clock.now.date() >= last_monday, "the weekly job's own prune ran after its last backup"
    for job, days in expected.items():
        live = app.catalog.list(job=job)
        assert {b.started_at.date() for b in live} == days, job
        on_disk = {p.parent.name for p in (tmp_path / "backups" / job).glob("*/volume-v.tar.zst")}
        assert on_disk == {b.id for b in live}, f"{job}: exactly the kept backups remain on disk"
    app.close()
