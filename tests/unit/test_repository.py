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
     "destinations.far.key_file: format: repository (job j) logs in to SFTP with a key: set key_file"),
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
    db.execute("DELETE FROM backupd_schema WHERE version >= 6")
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


def test_an_sftp_destination_with_a_key_holds_a_repository():
    data = config_of({"format": "repository", "repository_password": "x", "destinations": ["far"]})
    data["destinations"]["far"] = {"type": "sftp", "host": "h", "user": "u", "key_file": "/k",
                                   "host_key_fingerprint": "SHA256:x"}
    assert parse_config(data, env={}).jobs["j"].format == "repository"


class RecordingHost:
    """Records the helper a Restic call would start."""

    helper_image = "img"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []

    def run_helper(self, command, mounts, purpose, caps=(), **options):
        self.calls.append((command, options))
        return ""


def test_an_sftp_session_makes_its_ssh_files_on_a_tmpfs_and_keeps_secrets_out_of_the_command_line():
    from backupd.repository import SECRETS_POINT, Repository, Restic

    host = RecordingHost()
    repo = Repository("far", "_restic/j", "sftp:u@h:/r/_restic/j", (),
                      {"BACKUPD_SSH_KEY": "PRIVATE-KEY-BODY", "BACKUPD_KNOWN_HOSTS": "h ssh-ed25519 AAAA"},
                      "host", "repo-password", ("-o", "sftp.command=ssh -i /run/backupd/ssh_key h -s sftp"),
                      (("BACKUPD_SSH_KEY", "ssh_key"), ("BACKUPD_KNOWN_HOSTS", "known_hosts")))
    Restic(host, parse_config({}, env={})).run(repo, ["snapshots", "--json"], "test")
    [(command, options)] = host.calls
    script = command[2]
    assert script.startswith("umask 077 && ")
    assert f'"$BACKUPD_SSH_KEY" >{SECRETS_POINT}/ssh_key' in script
    # Every restic command of the session (unlock, then the one asked for) gets the ssh command.
    assert script.count("restic -o 'sftp.command=ssh -i /run/backupd/ssh_key h -s sftp'") == 2
    assert options["tmpfs"] == {SECRETS_POINT: "size=1m,mode=0700"}
    assert options["environment"]["BACKUPD_SSH_KEY"] == "PRIVATE-KEY-BODY"
    assert options["environment"]["RESTIC_PASSWORD"] == "repo-password"
    assert not any(secret in part for part in command for secret in ("PRIVATE-KEY-BODY", "repo-password"))


def test_a_repository_without_secret_files_gets_no_tmpfs():
    from backupd.repository import Repository, Restic

    host = RecordingHost()
    Restic(host, parse_config({}, env={})).run(Repository("local", "_restic/j", "/repository"), ["check"], "t")
    [(command, options)] = host.calls
    assert options["tmpfs"] is None and "printf" not in command[2]


# ------------------------------------------------------------------ several destinations


def local_repo(dest: str, source: str) -> "Repository":
    from docker.types import Mount

    from backupd.repository import REPOSITORY_POINT, Repository

    return Repository(dest, "_restic/j", REPOSITORY_POINT, (Mount(REPOSITORY_POINT, source, type="bind"),),
                      password=f"pw-{dest}")


def catalog_over(snaps: list[dict], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Catalog:
    """An empty catalog to rebuild, with restic (faked) listing `snaps` in every destination's
    repository: what `catalog rebuild` reads, without an engine (tests/integration rebuilds
    from real repositories)."""
    import backupd.repository as repository

    class Listing:
        def __init__(self, *a): pass
        def snapshots(self, repo): return snaps

    monkeypatch.setattr(repository, "Restic", Listing)
    monkeypatch.setattr(repository, "open_repository", lambda config, host, job, dest: local_repo(dest, "/b"))
    return Catalog(f"sqlite:///{tmp_path}/c.db")


def test_a_copy_session_moves_a_local_source_aside_and_names_it_the_source():
    from backupd.repository import SOURCE_REPOSITORY_POINT, copy_session

    session = copy_session(local_repo("a", "/backups/a"), local_repo("b", "/backups/b"))
    assert session is not None and session.local
    assert [(m["Target"], m["Source"]) for m in session.mounts] == [
        ("/repository", "/backups/b"), (SOURCE_REPOSITORY_POINT, "/backups/a")]
    assert session.env == {"RESTIC_FROM_REPOSITORY": SOURCE_REPOSITORY_POINT, "RESTIC_FROM_PASSWORD": "pw-a"}
    assert session.password == "pw-b"


def test_one_helper_cannot_copy_between_two_s3_stores_with_different_credentials_or_two_ssh_servers():
    from backupd.repository import Repository, copy_session

    def s3(dest: str, secret: str) -> Repository:
        return Repository(dest, "_restic/j", f"s3:http://x/{dest}", (), {"AWS_SECRET_ACCESS_KEY": secret}, "host")

    def sftp(dest: str, host: str) -> Repository:
        return Repository(dest, "_restic/j", f"sftp:u@{host}:/r", (), {"BACKUPD_SSH_KEY": "k"}, "host",
                          options=("-o", f"sftp.command=ssh {host}"), files=(("BACKUPD_SSH_KEY", "ssh_key"),))

    assert copy_session(s3("a", "one"), s3("b", "two")) is None
    assert copy_session(s3("a", "same"), s3("b", "same")) is not None
    assert copy_session(sftp("a", "h1"), sftp("b", "h2")) is None
    both = copy_session(s3("a", "one"), sftp("b", "h1"))
    assert both is not None and both.options == ("-o", "sftp.command=ssh h1") and both.files
    assert both.env["RESTIC_FROM_REPOSITORY"] == "s3:http://x/a" and both.env["AWS_SECRET_ACCESS_KEY"] == "one"


class FakeRestic:
    """Backups and copies as restic would answer them; `fail` names destinations that fail."""

    def __init__(self, fail_backup=(), fail_copy=()):
        self.fail_backup, self.fail_copy = set(fail_backup), set(fail_copy)
        self.backups: list[str] = []
        self.copies: list[tuple[str, list[str]]] = []

    def backup(self, repo, source, job, backup_id):
        from backupd.repository import RepositoryError

        self.backups.append(repo.destination)
        if repo.destination in self.fail_backup:
            raise RepositoryError(f"{repo.destination} is down")
        return {"snapshot_id": f"{repo.destination}-{source.name}", "data_added": 7, "total_bytes_processed": 100}

    def copy(self, session, ids, backup_id):
        from backupd.repository import RepositoryError

        self.copies.append((session.destination, ids))
        if session.destination in self.fail_copy:
            raise RepositoryError(f"{session.destination} is down")
        return {i: f"{session.destination}-copy-of-{i}" for i in ids}


def writer_with(fake: FakeRestic, repos: dict) -> "SnapshotWriter":
    from backupd.repository import SnapshotWriter, copy_session

    writer = SnapshotWriter.__new__(SnapshotWriter)
    writer.restic, writer.job, writer.repos, writer.broken = fake, "j", repos, {}
    order = sorted(repos, key=lambda d: not repos[d].local)
    writer.primary = order[0]
    writer.sessions = {d: copy_session(repos[order[0]], repos[d]) for d in order[1:]}
    writer.direct, writer.pending = [], []
    return writer


def volume(name: str):
    from backupd.docker_host import VolumeSource

    return VolumeSource(name, "volume", name, "jobs.j.volumes[0]")


def test_each_volume_is_read_once_and_copied_to_the_others_after_every_volume_is_read(tmp_path: Path):
    from backupd.repository import Repository

    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    fake = FakeRestic()
    repos = {"s3": Repository("s3", "_restic/j", "s3:http://x/b", network="host"),
             "local": local_repo("local", "/b")}
    writer = writer_with(fake, repos)
    bid = catalog.start_backup("j")
    for name in ("a", "b"):
        writer.snapshot(catalog, bid, volume(name))
    assert fake.backups == ["local", "local"] and fake.copies == []
    writer.finish(catalog, bid)
    assert fake.copies == [("s3", ["local-a", "local-b"])]  # one copy for the whole run
    assert catalog.finish_backup(bid) == "succeeded"
    copies = {(a.name, c.destination): c for a in catalog.get(bid).artifacts for c in a.copies}
    assert copies[("a", "s3")].snapshot_id == "s3-copy-of-local-a" and copies[("a", "s3")].bytes_added is None
    assert copies[("a", "local")].bytes_added == 7 and copies[("a", "s3")].bytes_covered == 100


def test_a_failed_copy_fails_that_destination_only_and_a_failed_primary_backup_reads_into_the_others(
        tmp_path: Path):
    from backupd.repository import Repository

    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    repos = {"local": local_repo("local", "/b"), "s3": Repository("s3", "_restic/j", "s3:http://x/b", network="host")}
    fake = FakeRestic(fail_copy={"s3"})
    writer = writer_with(fake, repos)
    bid = catalog.start_backup("j")
    writer.snapshot(catalog, bid, volume("a"))
    writer.finish(catalog, bid)
    assert catalog.finish_backup(bid) == "partial"
    [art] = catalog.get(bid).artifacts
    assert {c.destination: c.status for c in art.copies} == {"local": "stored", "s3": "failed"}
    assert "s3 is down" in (art.error or "")

    fake = FakeRestic(fail_backup={"local"})
    writer = writer_with(fake, repos)
    bid = catalog.start_backup("j")
    writer.snapshot(catalog, bid, volume("a"))
    writer.finish(catalog, bid)
    assert fake.backups == ["local", "s3"] and fake.copies == []  # read directly, nothing to copy from
    [art] = catalog.get(bid).artifacts
    assert {c.destination: c.status for c in art.copies} == {"local": "failed", "s3": "stored"}


def test_an_interrupted_run_records_the_snapshots_it_made_and_fails_the_rest(tmp_path: Path):
    from backupd.repository import Repository

    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    repos = {"local": local_repo("local", "/b"), "s3": Repository("s3", "_restic/j", "s3:http://x/b", network="host")}
    writer = writer_with(FakeRestic(), repos)
    bid = catalog.start_backup("j")
    writer.snapshot(catalog, bid, volume("a"))
    writer.abandon(catalog, "interrupted")
    [art] = catalog.get(bid).artifacts
    assert {c.destination: (c.status, c.error) for c in art.copies} == {
        "local": ("stored", None), "s3": ("failed", "interrupted")}


# ------------------------------------------------------------------ catalog rebuild


def test_rebuild_groups_backupd_snapshots_by_run_and_leaves_other_snapshots_out(tmp_path: Path, monkeypatch,
                                                                                caplog):
    import backupd.repository as repository

    snaps = [
        {"short_id": "s1", "time": "2026-11-22T03:00:05.123456789Z", "paths": ["/data/a"],
         "tags": ["backupd", "job=j", "backup=20261122T030000Z-abc123"]},
        {"short_id": "s2", "time": "2026-11-22T03:00:09Z", "paths": ["/data/b"],
         "tags": ["backupd", "job=j", "backup=20261122T030000Z-abc123"]},
        {"short_id": "s3", "time": "2026-11-23T03:00:01Z", "paths": ["/data/a"],
         "tags": ["backupd", "job=j", "backup=20261123T030000Z-def456"]},
        {"short_id": "x1", "time": "2026-11-23T04:00:00Z", "paths": ["/home"], "tags": ["mine"]},
        {"short_id": "x2", "time": "2026-11-23T04:00:00Z", "paths": ["/data/a"],
         "tags": ["backupd", "job=other", "backup=20261123T030000Z-def456"]},
        {"short_id": "x3", "time": "2026-11-23T04:00:00Z", "paths": ["/data/../etc"],
         "tags": ["backupd", "job=j", "backup=../../evil"]},
    ]

    catalog = catalog_over(snaps, monkeypatch, tmp_path)
    imported, skipped = repository.rebuild_from_repository(None, catalog, None, "j", "far")
    assert imported == ["20261122T030000Z-abc123", "20261123T030000Z-def456"] and skipped == []
    first = catalog.get("20261122T030000Z-abc123")
    assert first.status == "succeeded" and first.started_at == datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
    assert [(a.name, [(c.destination, c.key, c.status, c.snapshot_id) for c in a.copies]) for a in first.artifacts] \
        == [("a", [("far", "_restic/j", "stored", "s1")]), ("b", [("far", "_restic/j", "stored", "s2")])]
    assert sum("was not made by backupd" in r.getMessage() for r in caplog.records) == 3

    # From another destination: the same runs gain that destination's snapshots.
    imported, skipped = repository.rebuild_from_repository(None, catalog, None, "j", "local")
    assert imported == [] and len(skipped) == 2
    assert {c.destination: c.snapshot_id for c in catalog.get("20261123T030000Z-def456").artifacts[0].copies} \
        == {"far": "s3", "local": "s3"}


def test_rebuild_takes_dumps_back_with_the_source_their_snapshot_names_and_leaves_out_those_without(
        tmp_path: Path, monkeypatch, caplog):
    import backupd.repository as repository

    run = "20261122T030000Z-abc123"
    tags = ["backupd", "job=j", f"backup={run}"]
    snaps = [
        {"short_id": "v1", "time": "2026-11-22T03:00:09Z", "paths": ["/data/a"],
         "tags": repository.snapshot_tags("j", run, "volume:app_data", ("cache/*", "a,b")).split(",")},
        {"short_id": "d1", "time": "2026-11-22T03:00:02Z", "paths": [repository.input_path("database", "pg.a/b c")],
         "tags": repository.snapshot_tags("j", run, "postgres:pg/a%2Fb%20c").split(",")},
        {"short_id": "d2", "time": "2026-11-22T03:00:03Z", "paths": ["/database-old"], "tags": tags},
        {"short_id": "d3", "time": "2026-11-22T03:00:04Z", "paths": ["/database-x"],
         "tags": [*tags, "source=nonsense"]},
        {"short_id": "d4", "time": "2026-11-22T03:00:04Z", "paths": ["/database-a%2"], "tags": tags},
        {"short_id": "d5", "time": "2026-11-22T03:00:04Z", "paths": ["/elsewhere-x"], "tags": tags},
    ]

    catalog = catalog_over(snaps, monkeypatch, tmp_path)
    assert repository.rebuild_from_repository(None, catalog, None, "j", "far") == ([run], [])
    backup = catalog.get(run)
    assert backup.status == "succeeded"
    assert [(a.kind, a.name, a.source, a.status, a.compression, a.excludes,
             [(c.destination, c.status, c.snapshot_id) for c in a.copies]) for a in backup.artifacts] == [
        ("database", "pg.a/b c", "postgres:pg/a%2Fb%20c", "succeeded", "restic", (), [("far", "stored", "d1")]),
        ("volume", "a", "volume:app_data", "succeeded", "restic", ("cache/*", "a,b"), [("far", "stored", "v1")])]
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 4
    assert sum("not what it was dumped from" in m for m in left_out) == 2
    assert any("restic dump d2 /database-old" in m for m in left_out)

    # Another destination's snapshot of the dump joins the run the catalog now holds.
    snaps[1] = {**snaps[1], "short_id": "e1"}
    assert repository.rebuild_from_repository(None, catalog, None, "j", "near") == ([], [run])
    [dump] = [a for a in catalog.get(run).artifacts if a.kind == "database"]
    assert {c.destination: c.snapshot_id for c in dump.copies} == {"far": "d1", "near": "e1"}


def test_snapshot_tags_carry_any_source_as_one_tag():
    from backupd.names import decode_name
    from backupd.repository import snapshot_tags

    tags = snapshot_tags("j", "20261122T030000Z-abc123", "bind:/srv/a,b c").split(",")
    assert tags[:3] == ["backupd", "job=j", "backup=20261122T030000Z-abc123"] and len(tags) == 4
    assert decode_name(tags[3].removeprefix("source=")) == "bind:/srv/a,b c"


def test_an_sftp_repository_hands_ssh_the_verified_key_only_and_no_secret_on_its_command_line(
        tmp_path: Path, monkeypatch):
    import paramiko

    import backupd.repository as repository
    from backupd.storage.sftp import SftpStore

    server_key = paramiko.RSAKey.generate(1024)
    monkeypatch.setattr(SftpStore, "host_key", lambda self: server_key)
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETBODY\n-----END OPENSSH PRIVATE KEY-----\n")
    data = config_of({"format": "repository", "repository_password": "pw", "destinations": ["far"]})
    data["destinations"]["far"] = {"type": "sftp", "host": "backup.example", "port": 2222, "user": "u",
                                   "key_file": str(tmp_path / "id"), "path": "/srv/b",
                                   "host_key_fingerprint": "SHA256:x"}
    config = parse_config(data, env={})

    class NoContainer:
        def own_container(self): return None

    repo = repository.open_repository(config, NoContainer(), "j", "far")
    assert repo.location == "sftp:u@backup.example:/srv/b/_restic/j" and not repo.local
    assert repo.network == "bridge"
    assert repo.env["BACKUPD_KNOWN_HOSTS"] == f"[backup.example]:2222 ssh-rsa {server_key.get_base64()}"
    assert "SECRETBODY" in repo.env["BACKUPD_SSH_KEY"]
    [command] = [o.removeprefix("sftp.command=") for o in repo.options if o.startswith("sftp.command=")]
    assert "StrictHostKeyChecking=yes" in command and "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256,ssh-rsa" in command
    assert "-p 2222 -l u backup.example -s sftp" in command and "SECRETBODY" not in command
    assert "SECRETBODY" not in repr(repo)
# ------------------------------------------------------------------ dumps streamed into repositories


class FakeFeed:
    """A fed helper that keeps what it is given; `exits` makes its restic fail at finish."""

    def __init__(self, dest: str, exits: bool = False) -> None:
        self.dest, self.exits, self.data, self.events = dest, exits, bytearray(), []

    def write(self, chunk: bytes) -> bool:
        self.data += chunk
        return True

    def finish(self) -> str:
        self.events.append("finish")
        if self.exits:
            from backupd.docker_host import HelperError

            raise HelperError("helper for x exited 1: Fatal: unable to save snapshot")
        return ('{"message_type":"summary","snapshot_id":"snap' + self.dest + '","data_added":7,'
                f'"total_bytes_processed":{len(self.data)}}}\n')

    def abort(self) -> None:
        self.events.append("abort")


def stream_writer(feeds: dict[str, FakeFeed], broken: dict[str, str] | None = None):
    from contextlib import nullcontext

    from backupd.repository import Repository, SnapshotWriter

    class FakeRestic:
        unlocked: list[str] = []

        def backup_input(self, repo, path, job, backup_id, source, purpose):
            assert path == "/database-pg.app"
            return nullcontext(feeds[repo.destination])

        def run(self, repo, args, purpose, *a, **k):
            self.unlocked.append(repo.destination)
            return ""

    writer = object.__new__(SnapshotWriter)
    writer.restic, writer.job, writer.broken = FakeRestic(), "j", dict(broken or {})
    writer.repos = {d: Repository(d, "_restic/j", "/repository") for d in feeds}
    return writer


def dump_source(chunks: list[bytes], error: Exception | None = None):
    from contextlib import contextmanager

    @contextmanager
    def opener():
        def gen():
            yield from chunks
            if error is not None:
                raise error
        yield gen()
    return opener


def test_a_dump_is_read_once_and_every_repository_gets_all_of_it(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    bid = catalog.start_backup("j")
    feeds = {"local": FakeFeed("local"), "s3": FakeFeed("s3")}
    status = stream_writer(feeds).stream(catalog, bid, "database", "pg.app", "postgres:pg/app",
                                         dump_source([b"PGDMP", b"rest"]))
    assert status == "succeeded"
    assert [bytes(f.data) for f in feeds.values()] == [b"PGDMPrest"] * 2
    [art] = catalog.get(bid).artifacts
    assert (art.kind, art.compression, art.size) == ("database", "restic", 9)
    assert {(c.destination, c.snapshot_id) for c in art.copies} == {("local", "snaplocal"), ("s3", "snaps3")}


def test_a_failing_dump_kills_every_helper_before_it_finishes_and_fails_the_artifact(tmp_path: Path):
    from backupd.quiesce.databases import DumpError

    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    bid = catalog.start_backup("j")
    feeds = {"local": FakeFeed("local"), "s3": FakeFeed("s3")}
    writer = stream_writer(feeds)
    with pytest.raises(DumpError):
        writer.stream(catalog, bid, "database", "pg.app", "postgres:pg/app",
                      dump_source([b"PGDMP", b"half"], DumpError("pg_dump in pg failed (exit 1): boom")))
    assert [f.events for f in feeds.values()] == [["abort"], ["abort"]], "a cut dump must never be finished"
    assert sorted(writer.restic.unlocked) == ["local", "s3"]  # the killed helpers' locks are removed
    [art] = catalog.get(bid).artifacts
    assert art.status == "failed" and "(exit 1): boom" in (art.error or "")
    assert all(c.status == "failed" and c.snapshot_id is None for c in art.copies)


def test_one_repository_refusing_the_dump_makes_it_partial_and_an_unusable_one_is_named(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.db")
    bid = catalog.start_backup("j")
    feeds = {"local": FakeFeed("local"), "s3": FakeFeed("s3", exits=True)}
    status = stream_writer(feeds, broken={"far": "repository unreachable"}).stream(
        catalog, bid, "database", "pg.app", "postgres:pg/app", dump_source([b"x"]))
    assert status == "partial"
    [art] = catalog.get(bid).artifacts
    copies = {c.destination: c for c in art.copies}
    assert copies["local"].status == "stored"
    assert copies["s3"].status == "failed" and "unable to save snapshot" in (copies["s3"].error or "")
    assert copies["far"].status == "failed" and copies["far"].error == "repository unreachable"
