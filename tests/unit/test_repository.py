"""Repository mode without an engine: config, catalog rows of snapshots, and retention's hand-off
to `restic forget` (the engine side is tests/integration/test_repository.py)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from backupd.catalog import Catalog
from backupd.config import parse_config
from backupd.errors import ConfigError
from backupd.prune import find_orphans, prune_job
from backupd.storage.local import LocalStore

UTC = timezone.utc
NOW = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


def config_of(job: dict, **top) -> dict:
    return {"destinations": {"local": {"type": "local", "path": "/tmp/x"}},
            "jobs": {"j": {"volumes": ["v"], **job}}, **top}


def test_format_defaults_to_archive_and_repository_is_accepted_with_a_password(tmp_path: Path):
    assert parse_config(config_of({}), env={}).jobs["j"].format == "archive"
    (tmp_path / "pw").write_text("s3cret\n")
    config = parse_config(config_of({"format": "repository", "repository_password_file": str(tmp_path / "pw")}),
                          env={})
    assert config.repository_password("j", "local").get_secret_value() == "s3cret"


def test_a_destinations_password_serves_every_repository_job_on_it():
    data = config_of({"format": "repository"})
    data["destinations"]["local"]["repository_password"] = "on-the-destination"
    config = parse_config(data, env={})
    assert config.repository_password("j", "local").get_secret_value() == "on-the-destination"


@pytest.mark.parametrize("job, top, message", [
    ({"format": "repository"}, {},
     "jobs.j.repository_password: format: repository needs a password"),
    ({"format": "tarball"}, {}, "jobs.j.format: Input should be 'archive' or 'repository'"),
    ({"format": "repository", "repository_password": "x", "encryption": {"age_recipients": ["age1x"]}}, {},
     "jobs.j.encryption: a repository is encrypted by restic"),
    ({"format": "repository", "repository_password": "x", "destinations": ["far"]},
     {"destinations": {"far": {"type": "sftp", "host": "h", "user": "u", "password": "p",
                               "host_key_fingerprint": "SHA256:x"}}},
     "jobs.j.destinations: destination 'far' is sftp: format: repository supports local, s3"),
])
def test_repository_config_errors_name_the_key(job, top, message):
    data = config_of(job)
    data.update(top)
    with pytest.raises(ConfigError) as err:
        parse_config(data, env={})
    assert message in str(err.value)


def test_database_dumps_are_accepted_in_repository_mode():
    config = parse_config(config_of({"format": "repository", "repository_password": "x", "databases": [
        {"name": "pg", "type": "postgres", "container": "c"}]}), env={})
    assert [d.name for d in config.jobs["j"].databases] == ["pg"]


def test_a_v5_catalog_gains_the_snapshot_columns(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/c.db"
    Catalog(url).close()
    db = sqlite3.connect(tmp_path / "c.db")
    for column in ("snapshot_id", "bytes_added", "bytes_covered"):
        db.execute(f"ALTER TABLE copies DROP COLUMN {column}")
    db.execute("DELETE FROM backupd_schema WHERE version = 6")
    db.commit()
    db.close()
    catalog = Catalog(url)
    bid = catalog.start_backup("j")
    art = catalog.add_artifact(bid, "volume", "v", "volume:v", "restic", "restic", {"local": "_restic/j"})
    catalog.finish_snapshots(art, {"local": ("abcd1234", 10, 1000)}, {})
    [copy] = catalog.get(bid).artifacts[0].copies
    assert (copy.snapshot_id, copy.bytes_added, copy.bytes_covered) == ("abcd1234", 10, 1000)


def snapshot_backup(catalog: Catalog, when: datetime, volumes=("a", "b"),
                    failing: dict[str, str] | None = None) -> str:
    bid = catalog.start_backup("j", now=when)
    for v in volumes:
        art = catalog.add_artifact(bid, "volume", v, f"volume:{v}", "restic", "restic",
                                   {"local": "_restic/j", "far": "_restic/j"})
        ok = {d: (f"{bid[-6:]}{v}{d}", 5, 100) for d in ("local", "far") if d not in (failing or {})}
        catalog.finish_snapshots(art, ok, failing or {})
    catalog.finish_backup(bid)
    return bid


def test_one_destination_without_its_snapshot_makes_the_run_partial(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    bid = snapshot_backup(catalog, NOW, failing={"far": "repository unreachable"})
    backup = catalog.get(bid)
    assert backup.status == "partial"
    statuses = {(c.destination, c.status) for a in backup.artifacts for c in a.copies}
    assert statuses == {("local", "stored"), ("far", "failed")}
    assert "far: repository unreachable" in (backup.error or "")


def test_prune_forgets_exactly_the_doomed_snapshots_and_deletes_only_what_was_forgotten(tmp_path: Path):
    config = parse_config({
        "catalog": f"sqlite:///{tmp_path}/c.db",
        "destinations": {"local": {"type": "local", "path": str(tmp_path / "l"), "repository_password": "p"},
                         "far": {"type": "local", "path": str(tmp_path / "f"), "repository_password": "p"}},
        "jobs": {"j": {"volumes": ["a", "b"], "format": "repository", "retention": {"keep_last": 1}}},
    }, env={})
    catalog = Catalog(config.catalog)
    old = snapshot_backup(catalog, NOW - timedelta(days=2))
    older = snapshot_backup(catalog, NOW - timedelta(days=3))
    new = snapshot_backup(catalog, NOW - timedelta(days=1))
    asked: list[list[str]] = []

    def forget(doomed):
        from backupd.repository import forget_doomed

        class FakeRestic:
            def __init__(self, *a): pass
            def forget(self, repo, ids): asked.append(sorted(ids))

        import backupd.repository as repository
        real_restic, real_open = repository.Restic, repository.open_repository
        repository.Restic = FakeRestic
        repository.open_repository = lambda config, host, job, dest: dest
        try:
            return forget_doomed(config, catalog, None, doomed)
        finally:
            repository.Restic, repository.open_repository = real_restic, real_open

    stores = {"local": LocalStore("local", tmp_path / "l"), "far": LocalStore("far", tmp_path / "f")}
    report = prune_job(config, catalog, "j", NOW, stores, forget=forget)
    assert sorted(report.deleted) == sorted([old, older]) and report.failures == []
    # One forget per repository, naming exactly the doomed runs' snapshots of every volume.
    doomed = sorted(f"{b[-6:]}{v}" for b in (old, older) for v in ("a", "b"))
    assert sorted(asked) == [sorted(f"{d}far" for d in doomed), sorted(f"{d}local" for d in doomed)]
    assert catalog.get(new).deleted_at is None
    # Without a forget (or when it fails) a snapshot is never "deleted" through the store.
    newest = snapshot_backup(catalog, NOW)
    report = prune_job(config, catalog, "j", NOW + timedelta(hours=1), stores)
    assert report.deleted == [] and catalog.get(new).deleted_at is None
    assert {c.status for a in catalog.get(new).artifacts for c in a.copies} == {"stored"}
    assert newest


def test_orphan_search_leaves_repositories_alone(tmp_path: Path):
    store = LocalStore("local", tmp_path)
    for key in ("_restic/j/config", "_restic/j/keys/k1", "_restic/j/index/i1", "j/20260101T000000Z-abcdef/x"):
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    report = find_orphans(Catalog(f"sqlite:///{tmp_path}/c.db"), {"local": store}, delete=True)
    assert report.orphans == [("local", "j/20260101T000000Z-abcdef/x")]
    assert (tmp_path / "_restic/j/config").exists()


def test_verify_hands_snapshots_to_the_restic_checker_and_leaves_their_status_alone(tmp_path: Path):
    from backupd.verify import verify_backup

    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    bid = snapshot_backup(catalog, NOW, volumes=("a",), failing={"far": "unreachable"})
    asked = []

    def check(job, dest, snapshot_id):
        asked.append((job, dest, snapshot_id))
        return True, "fine"

    results = verify_backup(parse_config({}, env={}), catalog, {}, bid, check_snapshot=check)
    assert [(r.destination, r.ok) for r in results] == [("local", True), ("far", False)]
    assert asked == [("j", "local", f"{bid[-6:]}alocal")]
    without = verify_backup(parse_config({}, env={}), catalog, {}, bid)
    assert not any(r.ok for r in without)
    assert {c.status for c in catalog.get(bid).artifacts[0].copies} == {"stored", "failed"}
