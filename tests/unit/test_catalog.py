"""The catalog records only what happened, and derives run status from artifacts."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from backupd.catalog import MIGRATIONS, Catalog
from backupd.errors import NotFoundError


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(f"sqlite:///{tmp_path}/sub/dir/catalog.db")


def add(catalog: Catalog, backup_id: str, name: str = "vol", dests=("local", "s3")) -> int:
    keys = {d: f"job/{backup_id}/volume-{name}.tar.zst" for d in dests}
    return catalog.add_artifact(backup_id, "volume", name, f"volume:{name}", "zstd", None, keys)


def test_creates_parent_directory_and_schema(tmp_path: Path, catalog: Catalog):
    db = tmp_path / "sub/dir/catalog.db"
    assert db.exists()
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master")}
    assert {"backups", "artifacts", "copies", "held_containers", "backupd_schema"} <= tables


def test_migrate_is_idempotent_across_restarts(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    Catalog(url).start_backup("j")
    again = Catalog(url)
    assert len(again.list()) == 1
    versions = sqlite3.connect(tmp_path / "c.db").execute("select version from backupd_schema").fetchall()
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]


def test_a_v1_catalog_gains_block_checksums_and_keeps_its_backups(tmp_path: Path):
    """Catalogs written by the first release are migrated in place on start."""
    url = f"sqlite:///{tmp_path}/c.db"
    old = Catalog(url)
    backup_id = old.start_backup("j")
    art = old.add_artifact(backup_id, "volume", "v", "volume:v", "zstd", None, {"local": "k"})
    old.finish_artifact(art, 10, "ab" * 32, {})
    old.close()
    con = sqlite3.connect(tmp_path / "c.db")
    con.execute("drop table artifact_blocks")
    con.execute("delete from backupd_schema where version >= 2")
    con.commit()
    con.close()

    catalog = Catalog(url)
    assert [b.id for b in catalog.list()] == [backup_id]
    assert catalog.blocks(art) is None  # stored before: restore proves the whole copy first
    art2 = catalog.add_artifact(backup_id, "volume", "w", "volume:w", "zstd", None, {"local": "k2"})
    catalog.finish_artifact(art2, 10, "cd" * 32, {}, blocks=(4096, b"\x01" * 32))
    assert catalog.blocks(art2) == (4096, b"\x01" * 32)


def test_a_v2_catalog_gains_backup_sizes_and_counts_from_its_artifacts(tmp_path: Path):
    """Schema v3 keeps each backup's total size and artifact count on its row; older rows are filled in."""
    url = f"sqlite:///{tmp_path}/c.db"
    old = Catalog(url)
    two = old.start_backup("j", datetime(2026, 11, 22, tzinfo=timezone.utc))
    old.finish_artifact(add(old, two, "a"), 5 << 30, "ab" * 32, {})  # past 32-bit sizes
    old.finish_artifact(add(old, two, "b"), 7, "cd" * 32, {})
    add(old, two, "c")  # never finished: counted, no size
    none = old.start_backup("j", datetime(2026, 11, 23, tzinfo=timezone.utc))
    old.close()
    con = sqlite3.connect(tmp_path / "c.db")
    con.execute("drop index ix_backups_list")
    con.execute("alter table backups drop column total_size")
    con.execute("alter table backups drop column artifact_count")
    con.execute("delete from backupd_schema where version >= 3")
    con.commit()
    con.close()

    catalog = Catalog(url)
    assert [(s.id, s.size, s.artifacts) for s in catalog.summaries(job="j")] == [
        (none, 0, 0), (two, (5 << 30) + 7, 3)]
    indexes = {row[1] for row in sqlite3.connect(tmp_path / "c.db").execute("pragma index_list('backups')")}
    assert "ix_backups_list" in indexes
    catalog.finish_artifact(add(catalog, none, "d"), 11, "ef" * 32, {})  # kept up to date from here on
    assert next(catalog.summaries(job="j"))[4:] == (11, 1)


def test_an_artifact_is_finished_once(catalog: Catalog):
    """A second finish would count its size twice in the backup's total."""
    bid = catalog.start_backup("j")
    art = add(catalog, bid)
    catalog.finish_artifact(art, 10, "ab" * 32, {})
    with pytest.raises(Exception, match="already finished"):
        catalog.finish_artifact(art, 10, "ab" * 32, {})
    assert next(catalog.summaries()).size == 10


def test_newer_schema_is_refused(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    Catalog(url)
    con = sqlite3.connect(tmp_path / "c.db")
    con.execute("insert into backupd_schema values (99)")
    con.commit()
    with pytest.raises(Exception, match="newer than this backupd"):
        Catalog(url)


def test_all_copies_stored_means_succeeded(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    art = add(catalog, bid)
    assert catalog.finish_artifact(art, 123, "ab" * 32, {}) == "succeeded"
    assert catalog.finish_backup(bid) == "succeeded"
    view = catalog.get(bid)
    assert view.status == "succeeded" and view.finished_at is not None
    assert [c.status for c in view.artifacts[0].copies] == ["stored", "stored"]
    assert view.size == 123


def test_one_failed_copy_makes_the_backup_partial_and_says_why(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    art = add(catalog, bid)
    catalog.finish_artifact(art, 10, "cd" * 32, {"s3": "AccessDenied"})
    assert catalog.finish_backup(bid) == "partial"
    view = catalog.get(bid)
    copies = {c.destination: (c.status, c.error) for c in view.artifacts[0].copies}
    assert copies == {"local": ("stored", None), "s3": ("failed", "AccessDenied")}
    assert "s3: AccessDenied" in view.error


def test_failed_artifact_leaves_no_copy_claimed(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    art = add(catalog, bid)
    catalog.fail_artifact(art, "helper exited 2")
    assert catalog.finish_backup(bid) == "failed"
    view = catalog.get(bid)
    assert all(c.status == "failed" for c in view.artifacts[0].copies)
    assert view.artifacts[0].sha256 is None


def test_a_run_error_prevents_success(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    catalog.finish_artifact(add(catalog, bid), 1, "0" * 64, {})
    assert catalog.finish_backup(bid, "cancelled") == "partial"


def test_run_with_no_artifacts_is_failed(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    assert catalog.finish_backup(bid) == "failed"


def test_list_is_newest_first_and_filters_by_job(catalog: Catalog):
    t = [datetime(2026, 1, d, tzinfo=timezone.utc) for d in (1, 2, 3)]
    ids = [catalog.start_backup(j, now=ts) for j, ts in zip(("a", "b", "a"), t)]
    assert [b.id for b in catalog.list()] == ids[::-1]
    assert [b.id for b in catalog.list(job="a")] == [ids[2], ids[0]]
    assert catalog.list()[0].started_at == t[2]  # aware UTC comes back


def test_deleted_backups_are_hidden_unless_asked(catalog: Catalog):
    bid = catalog.start_backup("a")
    catalog.mark_deleted(bid)
    assert catalog.list() == []
    assert [b.id for b in catalog.list(include_deleted=True)] == [bid]


def test_unknown_backup_id(catalog: Catalog):
    with pytest.raises(NotFoundError, match="backup 'nope' is not in the catalog"):
        catalog.get("nope")


def test_list_json_contract(catalog: Catalog):
    bid = catalog.start_backup("nightly")
    catalog.finish_artifact(add(catalog, bid), 5, "e" * 64, {})
    catalog.finish_backup(bid)
    data = catalog.get(bid).to_json()
    assert {"id", "job", "status", "started_at", "finished_at", "artifacts"} <= set(data)
    art = data["artifacts"][0]
    assert {"kind", "name", "size", "sha256", "destinations"} <= set(art)
    assert art["destinations"][0]["destination"] == "local"
    assert data["started_at"].endswith("Z")


def alive_except(*dead: str):
    return lambda owner: owner not in dead


def test_interrupted_run_of_a_dead_owner_is_failed_and_a_live_owners_is_left_alone(catalog: Catalog):
    dead = catalog.start_backup("nightly", owner="dead-owner")
    add(catalog, dead)
    live = catalog.start_backup("nightly", owner="live-owner")
    assert catalog.fail_interrupted(alive_except("dead-owner")) == [dead]
    view = catalog.get(dead)
    assert view.status == "failed" and "interrupted" in view.error
    assert all(c.status == "failed" for c in view.artifacts[0].copies)
    assert catalog.get(live).status == "running"


def test_interrupted_run_from_before_owners_is_judged_by_its_pid(catalog: Catalog):
    """Rows written before schema v4 have no owner: their host and pid token decide."""
    bid = catalog.start_backup("nightly")  # no owner: this process's pid token
    assert catalog.fail_interrupted(alive_except()) == []  # we are alive
    with catalog.session() as s:  # pretend a dead process owned it
        from backupd.catalog.models import BackupRow
        s.get(BackupRow, bid).process = "4000000:1"
        s.commit()
    assert catalog.fail_interrupted(alive_except()) == [bid]
    assert os.getpid() > 0


def test_held_containers_of_a_dead_owner_on_this_engine_are_returned_for_recovery(catalog: Catalog):
    hold = catalog.hold_container("b1", "cid123", "web", owner="o1", engine_id="E1")
    other_engine = catalog.hold_container("b1", "cid456", "db", owner="o1", engine_id="E2")
    assert catalog.held_containers(alive_except(), "E1") == []  # alive: it will restart them itself
    assert catalog.held_containers(alive_except("o1"), "E1") == [(hold, "cid123", "web")]
    assert catalog.held_containers(alive_except("o1"), "E2") == [(other_engine, "cid456", "db")]
    catalog.release_container(hold)
    assert catalog.held_containers(alive_except("o1"), "E1") == []


def test_held_containers_from_before_owners_are_judged_by_their_pid(catalog: Catalog):
    hold = catalog.hold_container("b1", "cid123", "web")
    assert catalog.held_containers(alive_except(), "E1") == []  # ours: we are alive and will restart it
    with catalog.session() as s:
        from backupd.catalog.models import HeldContainerRow
        s.get(HeldContainerRow, hold).process = "1:12345"  # pid 1 reused after a restart
        s.commit()
    assert catalog.held_containers(alive_except(), "E1") == [(hold, "cid123", "web")]


def test_catalog_url_password_is_never_shown():
    with pytest.raises(Exception) as info:
        Catalog("postgresql://user:s3cret@127.0.0.1:1/db")
    assert "s3cret" not in str(info.value)


def test_summary_timestamps_are_aware_utc_from_text_or_datetime_columns():
    from backupd.catalog import BackupSummary, _stored_text

    expected = datetime(2026, 11, 23, 3, 0, 5, 120000, tzinfo=timezone.utc)
    # SQLite stores text
    assert BackupSummary("b", "j", "succeeded", "2026-11-23 03:00:05.120000", 0, 0).started_at == expected
    # PostgreSQL returns datetimes
    text = _stored_text(datetime(2026, 11, 23, 3, 0, 5, 120000))
    assert BackupSummary("b", "j", "succeeded", text, 0, 0).started_at == expected
    assert _stored_text(datetime(2026, 11, 23, 3, 0, 5))[:19] == "2026-11-23 03:00:05"


def test_summaries_newest_first_with_sizes_and_counts(catalog: Catalog):
    older = catalog.start_backup("job", datetime(2026, 11, 22, 3, 0, 5, 120000, tzinfo=timezone.utc))
    for name, size in (("a", 100), ("b", 23)):
        catalog.finish_artifact(add(catalog, older, name, dests=("local",)), size, "0" * 64, {})
    catalog.finish_backup(older)
    newer = catalog.start_backup("job", datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc))
    catalog.start_backup("other", datetime(2026, 11, 24, tzinfo=timezone.utc))
    summaries = list(catalog.summaries(job="job", batch=1))  # batches of one: every boundary
    assert [(s.id, s.status, s.size, s.artifacts) for s in summaries] == [
        (newer, "running", 0, 0), (older, "succeeded", 123, 2)]
    assert summaries[1].started_at == datetime(2026, 11, 22, 3, 0, 5, 120000, tzinfo=timezone.utc)
    assert summaries[1].started[:19] == "2026-11-22 03:00:05"


def test_longest_gives_the_widths_of_what_summaries_lists(catalog: Catalog):
    assert catalog.longest() == (0, 0, 0)
    a = catalog.start_backup("a-long-job-name")
    catalog.finish_backup(a)  # failed: no artifacts
    b = catalog.start_backup("j")
    gone = catalog.start_backup("a-job-name-longer-still-but-deleted")
    catalog.mark_deleted(gone)
    assert catalog.longest() == (len(a), len("a-long-job-name"), len("running"))
    assert catalog.longest(job="j") == (len(b), 1, len("running"))
    assert catalog.longest(job="nothing") == (0, 0, 0)


def test_a_v6_catalog_gains_excludes_and_file_counts_and_keeps_its_artifacts(tmp_path: Path):
    """Schema v7: each volume artifact records its exclude patterns and member count."""
    url = f"sqlite:///{tmp_path}/c.db"
    old = Catalog(url)
    bid = old.start_backup("j")
    old.finish_artifact(add(old, bid, "a"), 5, "ab" * 32, {})
    old.close()
    con = sqlite3.connect(tmp_path / "c.db")
    con.execute("alter table artifacts drop column excludes")
    con.execute("alter table artifacts drop column file_count")
    con.execute("delete from backupd_schema where version >= 7")
    con.commit()
    con.close()

    catalog = Catalog(url)
    [old_art] = catalog.get(bid).artifacts
    assert (old_art.excludes, old_art.file_count) == ((), None)
    art = catalog.add_artifact(bid, "volume", "b", "volume:b", "zstd", None, {"local": "k2"},
                               excludes=("cache/*", "tmp"))
    catalog.finish_artifact(art, 7, "cd" * 32, {}, file_count=42)
    new = catalog.get(bid).artifacts[1]
    assert (new.excludes, new.file_count) == (("cache/*", "tmp"), 42)
    assert new.to_json()["excludes"] == ["cache/*", "tmp"] and new.to_json()["file_count"] == 42
