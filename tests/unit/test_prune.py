"""Prune across destinations, orphans and catalog rebuild, on real SQLite and local stores."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from backupd.catalog import Catalog
from backupd.config import parse_config
from backupd.prune import find_orphans, prune_job, rebuild_catalog
from backupd.run import manifest_of, write_manifests
from backupd.storage.local import LocalStore

UTC = timezone.utc
NOW = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


@pytest.fixture
def env(tmp_path: Path):
    config = parse_config({
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "destinations": {"a": {"type": "local", "path": str(tmp_path / "a")},
                         "b": {"type": "local", "path": str(tmp_path / "b")}},
        "jobs": {"j": {"volumes": ["v"], "retention": {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12}}},
    }, env={})
    catalog = Catalog(config.catalog)
    stores = {"a": LocalStore("a", tmp_path / "a"), "b": LocalStore("b", tmp_path / "b")}
    return config, catalog, stores, tmp_path


def make_backup(catalog: Catalog, stores, when: datetime, status: str = "succeeded") -> str:
    """A backup as run.py records it: rows, one archive per store, and a manifest."""
    bid = catalog.start_backup("j", now=when)
    data = f"archive {bid}".encode()
    keys = {d: f"j/{bid}/volume-v.tar.zst" for d in stores}
    art = catalog.add_artifact(bid, "volume", "v", "volume:v", "zstd", None, keys)
    for dest, store in stores.items():
        if status != "failed":
            up = store.open_upload(keys[dest])
            up.write(data)
            up.commit()
    if status == "failed":
        catalog.fail_artifact(art, "helper died")
    else:
        catalog.finish_artifact(art, len(data), hashlib.sha256(data).hexdigest(), {})
    catalog.finish_backup(bid)
    write_manifests(catalog.get(bid), stores)
    return bid


def year_of_dailies(catalog, stores) -> dict[str, str]:
    first = date(2025, 11, 22)
    ids = {}
    for i in range(365):
        day = first + timedelta(days=i)
        ids[make_backup(catalog, stores, datetime(day.year, day.month, day.day, 3, tzinfo=UTC))] = day.isoformat()
    return ids


EXPECTED_DAYS = {"2026-11-21", "2026-11-20", "2026-11-19", "2026-11-18", "2026-11-17", "2026-11-16",
                 "2026-11-15", "2026-11-08", "2026-11-01", "2026-10-31", "2026-09-30", "2026-08-31",
                 "2026-07-31", "2026-06-30", "2026-05-31", "2026-04-30", "2026-03-31", "2026-02-28",
                 "2026-01-31", "2025-12-31"}


def archive_ids(store_root: Path) -> set[str]:
    return {p.parent.name for p in store_root.rglob("*.tar.zst")}


def test_a_year_of_dailies_leaves_exactly_the_gfs_set_in_catalog_and_every_store(env):
    config, catalog, stores, tmp = env
    ids = year_of_dailies(catalog, stores)
    report = prune_job(config, catalog, "j", NOW, stores)
    assert report.failures == []
    left = {b.id for b in catalog.list(job="j")}
    assert {ids[i] for i in left} == EXPECTED_DAYS
    for root in (tmp / "a", tmp / "b"):
        assert archive_ids(root) == left
        assert {p.parent.name for p in root.rglob("manifest.json")} == left
    deleted = catalog.list(job="j", include_deleted=True)
    assert len(deleted) == 365
    assert all(c.status == "deleted" for b in deleted if b.deleted_at for a in b.artifacts for c in a.copies)
    # running it again changes nothing
    again = prune_job(config, catalog, "j", NOW, stores)
    assert again.deleted == [] and {b.id for b in catalog.list(job="j")} == left


def test_dry_run_deletes_nothing(env):
    config, catalog, stores, tmp = env
    year_of_dailies(catalog, stores)
    report = prune_job(config, catalog, "j", NOW, stores, dry_run=True)
    assert sum(not d.keep for d in report.decisions) == 345
    assert len(catalog.list(job="j")) == 365 and len(archive_ids(tmp / "a")) == 365


class FailingStore(LocalStore):
    def __init__(self, *args):
        super().__init__(*args)
        self.broken = True

    def delete(self, key: str) -> None:
        if self.broken:
            raise ConnectionResetError("connection reset by peer")
        super().delete(key)


def test_a_destination_failing_during_deletion_keeps_the_truth_and_retries_next_time(env):
    config, catalog, stores, tmp = env
    flaky = FailingStore("b", tmp / "b")
    stores = {"a": stores["a"], "b": flaky}
    ids = [make_backup(catalog, stores, NOW - timedelta(days=d)) for d in range(20, 0, -1)]
    config = parse_config({"catalog": config.catalog, "destinations": {
        "a": {"type": "local", "path": str(tmp / "a")}, "b": {"type": "local", "path": str(tmp / "b")}},
        "jobs": {"j": {"volumes": ["v"], "retention": {"keep_last": 3}}}}, env={})
    report = prune_job(config, catalog, "j", NOW, stores)
    assert report.deleted == [] and len(report.failures) == 17  # archives on b; manifests stay with them
    assert "connection reset" in report.failures[0]
    for bid in ids[:17]:
        view = catalog.get(bid)
        assert view.deleted_at is None
        copies = {c.destination: c for c in view.artifacts[0].copies}
        assert copies["a"].status == "deleted" and copies["b"].status == "stored"
        assert "delete failed" in copies["b"].error
        assert (tmp / "b" / copies["b"].key).exists()
    flaky.broken = False
    report = prune_job(config, catalog, "j", NOW, stores)
    assert sorted(report.deleted) == sorted(ids[:17]) and report.failures == []
    assert archive_ids(tmp / "b") == set(ids[17:])


def test_newest_good_backup_survives_even_if_all_later_runs_failed(env):
    config, catalog, stores, tmp = env
    good = make_backup(catalog, stores, NOW - timedelta(days=400))
    for d in range(30, 20, -1):
        make_backup(catalog, stores, NOW - timedelta(days=d), status="failed")
    prune_job(config, catalog, "j", NOW, stores)
    assert [b.id for b in catalog.list(job="j")] == [good]


def stray_and_vanished(catalog, stores, tmp):
    """A backup whose copy on b vanished, and an object on a that no backup knows."""
    bid = make_backup(catalog, stores, NOW - timedelta(days=1))
    stray = tmp / "a" / "j" / "20200101T000000Z-abcdef" / "volume-v.tar.zst"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"unknown")
    (tmp / "b" / f"j/{bid}/volume-v.tar.zst").unlink()
    return bid, stray


def test_orphans_are_found_and_vanished_copies_marked_missing(env):
    config, catalog, stores, tmp = env
    bid, stray = stray_and_vanished(catalog, stores, tmp)
    report = find_orphans(catalog, stores)
    assert report.orphans == [("a", "j/20200101T000000Z-abcdef/volume-v.tar.zst")]
    assert report.missing == [(bid, "b", f"j/{bid}/volume-v.tar.zst")]
    assert stray.exists()  # listing only
    copies = {c.destination: c.status for c in catalog.get(bid).artifacts[0].copies}
    assert copies == {"a": "stored", "b": "missing"}
    report = find_orphans(catalog, stores, delete=True)
    assert report.removed == [("a", "j/20200101T000000Z-abcdef/volume-v.tar.zst")] and not stray.exists()


def test_a_dry_run_for_orphans_deletes_and_marks_nothing(env):
    config, catalog, stores, tmp = env
    bid, stray = stray_and_vanished(catalog, stores, tmp)
    report = find_orphans(catalog, stores, delete=True, dry_run=True)
    assert report.orphans == [("a", "j/20200101T000000Z-abcdef/volume-v.tar.zst")] and report.removed == []
    assert report.missing == [(bid, "b", f"j/{bid}/volume-v.tar.zst")]
    assert stray.exists()
    assert {c.destination: c.status for c in catalog.get(bid).artifacts[0].copies} == {"a": "stored", "b": "stored"}


def test_catalog_rebuilt_from_a_destination_after_the_database_is_lost(env):
    config, catalog, stores, tmp = env
    ids = [make_backup(catalog, stores, NOW - timedelta(days=d)) for d in (3, 2, 1)]
    before = [b.to_json() for b in catalog.list()]
    summaries = list(catalog.summaries())
    catalog.close()
    (tmp / "catalog.db").unlink()
    fresh = Catalog(config.catalog)
    assert fresh.list() == []
    imported, skipped = rebuild_catalog(fresh, "a", stores["a"])
    assert sorted(imported) == sorted(ids) and skipped == []
    assert {c.destination for b in fresh.list() for c in b.artifacts[0].copies} == {"a"}  # a's word on a only
    imported, skipped = rebuild_catalog(fresh, "b", stores["b"])  # b's copies, as b vouches for them
    assert imported == [] and sorted(skipped) == sorted(ids)
    after = [b.to_json() for b in fresh.list()]
    strip = lambda items: [{k: v for k, v in b.items() if k != "finished_at"} for b in items]  # noqa: E731
    assert [b["id"] for b in after] == [b["id"] for b in before]
    assert strip(after) == strip(before)
    assert list(fresh.summaries()) == summaries  # sizes and counts as `list` shows them
    imported, skipped = rebuild_catalog(fresh, "a", stores["a"])
    assert imported == [] and sorted(skipped) == sorted(ids)


def test_manifest_carries_what_rebuild_needs(env):
    config, catalog, stores, tmp = env
    bid = make_backup(catalog, stores, NOW)
    data = json.loads((tmp / "a" / "j" / bid / "manifest.json").read_text())
    assert data == json.loads(json.dumps(manifest_of(catalog.get(bid))))
    assert data["format"] == 1 and data["artifacts"][0]["sha256"]


def test_retention_deletes_nothing_while_the_newest_backup_lies_in_the_future(env) -> None:
    """A backup stamped while the clock ran a day ahead would outrank every later one, and
    keep_last/keep_daily would delete each new backup as it is made."""
    from backupd.prune import ClockSkewError

    config, catalog, stores, _ = env
    kept = [make_backup(catalog, stores, NOW - timedelta(days=d)) for d in range(1, 10)]
    ahead = make_backup(catalog, stores, NOW + timedelta(days=1))
    with pytest.raises(ClockSkewError, match=f"backup {ahead} started at .* ahead of this clock"):
        prune_job(config, catalog, "j", NOW, stores)
    assert {b.id for b in catalog.list()} == {*kept, ahead}  # nothing deleted
    assert prune_job(config, catalog, "j", NOW, stores, dry_run=True).decisions  # a dry run still shows
    minutes_ahead = make_backup(catalog, stores, NOW + timedelta(minutes=5))  # within the tolerance
    assert minutes_ahead
    catalog.mark_deleted(ahead)
    prune_job(config, catalog, "j", NOW, stores)  # runs again once the stray backup is gone
