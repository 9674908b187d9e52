"""Database dumps in repository mode, end to end: real PostgreSQL and MariaDB containers dump
through `restic backup --stdin` helpers into real repositories (local and SeaweedFS S3), and
come back through `restic dump` into the database. The repositories are read afterwards with
the host's restic, as a user would if backupd were gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from docker.errors import NotFound

from backupd.docker_host import HELPER_LABEL
from tests.integration.test_quiesce import maria, pg_data, pg_fingerprint, psql  # noqa: F401 - fixture
from tests.integration.test_repository import host_restic, repo_config, restic_image  # noqa: F401 - fixture
from tests.integration.test_volumes import REPO, backupd, listing, mountpoint

pytestmark = pytest.mark.integration


def tagged(repository: Path, password_file: Path, backup_id: str) -> list[dict]:
    """The snapshots of one backup in a repository, as the host's restic lists them."""
    proc = host_restic(repository, password_file, "snapshots", "--json", "--tag", f"backup={backup_id}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "[]")


def helpers_of(docker_client, *markers: str) -> list[str]:
    """This test's helper containers (others may run tests on the same engine): those whose
    mounts or environment name one of the markers (its directory, its bucket)."""
    found = []
    for c in docker_client.api.containers(all=True, filters={"label": HELPER_LABEL}):
        try:
            attrs = json.dumps(docker_client.api.inspect_container(c["Id"]))
        except NotFound:  # removed meanwhile
            continue
        if any(m in attrs for m in markers):
            found.append(c["Id"])
    return found


def test_postgres_dumps_go_to_every_repository_dedupe_across_runs_and_restore_row_by_row(
        docker_client, helper_image, restic_image, pg_data, tmp_path, s3_server, s3_bucket):
    destinations = {
        "local": {"type": "local", "path": str(tmp_path / "backups")},
        "s3": {"type": "s3", "bucket": s3_bucket, "region": "us-east-1", "endpoint_url": s3_server.endpoint_url,
               "access_key_id": s3_server.access_key, "secret_access_key": s3_server.secret_key},
    }
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"databases": [
        # Uncompressed, as the README advises: restic compresses, and a compressed dump deduplicates poorly.
        {"name": "pg", "type": "postgres", "container": pg_data.name, "database": ["app", "shop"],
         "options": ["--compress=0"]}]}}, destinations)
    # The second dump differs from the first only in its header (pg_dump's timestamp), so one restic chunk
    # changes, and a chunk can be up to 8 MiB. Over 40 MiB of rows make "under a quarter added" hold for any
    # chunk boundaries rather than for most: the repository's chunker polynomial is random.
    psql(docker_client, pg_data, "app", "CREATE TABLE IF NOT EXISTS bulk AS "
         "SELECT g AS id, repeat(md5(g::text), 8) AS txt FROM generate_series(1, 160000) g")
    before = pg_fingerprint(docker_client, pg_data, "app")
    first = backupd(config, "backup", "j")
    second = backupd(config, "backup", "j")
    assert (first.returncode, second.returncode) == (0, 0), first.stderr[-800:] + second.stderr[-800:]
    newest, oldest = listing(config)
    assert [newest["status"], oldest["status"]] == ["succeeded", "succeeded"]
    arts = {a["name"]: a for a in oldest["artifacts"]}
    assert set(arts) == {"pg.app", "pg.shop"} and all(a["kind"] == "database" for a in arts.values())
    for art in oldest["artifacts"] + newest["artifacts"]:
        assert {c["destination"] for c in art["destinations"]} == {"local", "s3"}
        assert all(c["status"] == "stored" and c["snapshot_id"] for c in art["destinations"])
    # The unchanged database's second dump deduplicates against the first.
    [again] = [a for a in newest["artifacts"] if a["name"] == "pg.app"]
    [local_again] = [c for c in again["destinations"] if c["destination"] == "local"]
    assert local_again["bytes_covered"] > 40 << 20
    assert local_again["bytes_added"] < local_again["bytes_covered"] // 4, local_again

    # The host's restic sees the dump as one file at a stable path, byte for byte what pg_dump made.
    repository, pw_file = tmp_path / "backups" / "_restic" / "j", tmp_path / "password"
    snaps = tagged(repository, pw_file, oldest["id"])
    assert sorted(p for s in snaps for p in s["paths"]) == ["/database-pg.app", "/database-pg.shop"]
    dumped = subprocess.run(["restic", "dump", "--quiet", local_again["snapshot_id"], "/database-pg.app"],
                            capture_output=True, timeout=120,
                            env={**os.environ, "RESTIC_REPOSITORY": str(repository),
                                 "RESTIC_PASSWORD_FILE": str(pw_file),
                                 "RESTIC_CACHE_DIR": str(tmp_path / "host-cache")})
    assert dumped.returncode == 0 and dumped.stdout[:5] == b"PGDMP"  # pg_dump's custom format

    psql(docker_client, pg_data, "postgres", "DROP DATABASE app WITH (FORCE)")
    restored = backupd(config, "restore", oldest["id"], "--database", "pg.app")
    assert restored.returncode == 0, restored.stderr[-800:]
    assert pg_fingerprint(docker_client, pg_data, "app") == before
    # Same rules as an archive's dump: a database with data is only overwritten with --force.
    refused = backupd(config, "restore", oldest["id"], "--database", "pg.app")
    assert refused.returncode == 3 and "--force" in refused.stderr
    forced = backupd(config, "restore", newest["id"], "--database", "pg.app", "--force")
    assert forced.returncode == 0, forced.stderr[-800:]
    assert pg_fingerprint(docker_client, pg_data, "app") == before

    logs = "".join(p.stdout + p.stderr for p in (first, second, restored, refused, forced))
    assert password not in logs and s3_server.secret_key not in logs
    assert password not in (tmp_path / "catalog.db").read_bytes().decode("latin-1")
    assert helpers_of(docker_client, str(tmp_path), s3_bucket) == []


def test_mariadb_dump_into_the_repository_drop_and_restore(
        docker_client, helper_image, restic_image, mariadb_container, tmp_path):
    db = mariadb_container
    maria(docker_client, db, "DROP DATABASE IF EXISTS rshop; CREATE DATABASE rshop CHARACTER SET utf8mb4; "
          "CREATE TABLE rshop.items (id INT PRIMARY KEY, name VARCHAR(100), data BLOB); "
          "USE rshop; INSERT INTO rshop.items VALUES (1, 'zażółć ✓ 日本語', X'00FF10'), (2, 'plain', NULL); "
          "INSERT INTO rshop.items SELECT seq + 10, CONCAT('row ', seq), UNHEX(MD5(seq)) FROM seq_1_to_50000;")
    digest = ("SET SESSION group_concat_max_len = 100000000; SELECT MD5(GROUP_CONCAT(id, name, "
              "HEX(COALESCE(data, '')) ORDER BY id SEPARATOR '|')), COUNT(*) FROM rshop.items")
    before = maria(docker_client, db, digest)
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"databases": [
        {"name": "maria", "type": "mariadb", "container": db.name, "database": ["rshop"]}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    maria(docker_client, db, "DROP DATABASE rshop")
    backupd(config, "restore", backup_id, "--database", "maria.rshop", check=True)
    assert maria(docker_client, db, digest) == before
    assert backupd(config, "restore", backup_id, "--database", "maria.rshop").returncode == 3
    maria(docker_client, db, "DROP DATABASE rshop")


@pytest.fixture
def half_dumpable(docker_client, mariadb_container):
    """A database whose dump writes one big table, then waits forever on the next one: another
    session holds a write lock on it. The lock goes away with the test."""
    db = mariadb_container
    maria(docker_client, db, "DROP DATABASE IF EXISTS half; CREATE DATABASE half; "
          "CREATE TABLE half.a (id INT PRIMARY KEY, pad VARCHAR(200)); "
          "USE half; INSERT INTO half.a SELECT seq, REPEAT(MD5(seq), 6) FROM seq_1_to_100000; "
          "CREATE TABLE half.z (id INT PRIMARY KEY); INSERT INTO half.z VALUES (1);")
    container = docker_client.containers.get(db.name)
    container.exec_run(["mariadb", "-uroot", "-e", "LOCK TABLES half.z WRITE; SELECT SLEEP(60);"],
                       environment={"MYSQL_PWD": db.password}, detach=True)
    time.sleep(1)
    yield db
    holders = maria(docker_client, db, "SELECT id FROM information_schema.processlist "
                   "WHERE info LIKE 'SELECT SLEEP(60)%'")
    for thread in holders.split():
        maria(docker_client, db, f"KILL {thread}")
    maria(docker_client, db, "DROP DATABASE IF EXISTS half")


def test_a_dump_killed_midway_by_its_timeout_fails_and_leaves_no_snapshot(
        docker_client, helper_image, restic_image, half_dumpable, tmp_path):
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"databases": [
        {"name": "half", "type": "mariadb", "container": half_dumpable.name, "database": ["half"],
         "timeout": "4s"}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1, proc.stderr[-800:]
    [backup] = listing(config)
    [art] = backup["artifacts"]
    assert backup["status"] == "failed" and art["status"] == "failed", proc.stderr[-1500:]
    assert "timed out after 4s" in art["error"], art["error"]
    assert all(c["status"] == "failed" and not c["snapshot_id"] for c in art["destinations"])
    repository, pw_file = tmp_path / "backups" / "_restic" / "j", tmp_path / "password"
    # restic would have stored the first table as a "whole" dump had it seen the end of its input.
    assert tagged(repository, pw_file, backup["id"]) == []
    check = host_restic(repository, pw_file, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert helpers_of(docker_client, str(tmp_path)) == []


def test_backupd_killed_mid_dump_leaves_no_snapshot_and_a_repository_restic_check_passes(
        docker_client, helper_image, restic_image, half_dumpable, volume_factory, tmp_path):
    config, _ = repo_config(tmp_path, helper_image, restic_image, {
        "j": {"databases": [{"name": "half", "type": "mariadb", "container": half_dumpable.name,
                             "database": ["half"]}]},
        "quick": {"volumes": [volume_factory("quick")]}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "j"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the dump is under way once restic's helper runs
        if helpers_of(docker_client, str(tmp_path)):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no restic helper started: " + proc.stderr.read().decode()[-800:])
    time.sleep(3)  # the first table is streamed; the dump now waits on the locked one
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(2)  # what restic would do with the end of its input, it would have done by now
    repository, pw_file = tmp_path / "backups" / "_restic" / "j", tmp_path / "password"
    snaps = host_restic(repository, pw_file, "snapshots", "--json", "--no-lock")
    assert snaps.returncode == 0 and json.loads(snaps.stdout or "[]") == [], snaps.stdout + snaps.stderr
    # The next backupd removes the dead run's helper, and marks its run failed.
    backupd(config, "backup", "quick", check=True)
    [backup] = [b for b in listing(config) if b["job"] == "j"]
    assert backup["status"] == "failed" and "interrupted" in backup["error"]
    assert helpers_of(docker_client, str(tmp_path)) == []
    # The killed restic's lock stays until backupd's next session on this repository removes it.
    check = host_restic(repository, pw_file, "check", "--no-lock")
    assert check.returncode == 0, check.stdout + check.stderr


def test_catalog_rebuild_takes_dumps_back_from_the_repository_and_restore_puts_the_data_back(
        docker_client, helper_image, restic_image, pg_data, volume_factory, tmp_path):
    vol = volume_factory("rebuild-dump")
    (mountpoint(docker_client, vol) / "a.txt").write_text("a\n")
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol], "databases": [
        {"name": "pg", "type": "postgres", "container": pg_data.name, "database": ["app"]}]}})
    before = pg_fingerprint(docker_client, pg_data, "app")
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [was] = listing(config)

    (tmp_path / "catalog.db").unlink()  # the catalog is lost; the repository is not
    rebuilt = backupd(config, "catalog", "rebuild", "--destination", "local")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "imported 1 backup(s) of job j from its repository on local" in rebuilt.stdout
    [got] = listing(config)
    assert got["id"] == backup_id and got["status"] == "succeeded"
    assert {(a["kind"], a["name"], a["source"], a["status"]) for a in got["artifacts"]} \
        == {(a["kind"], a["name"], a["source"], a["status"]) for a in was["artifacts"]} \
        == {("volume", vol, f"volume:{vol}", "succeeded"),
            ("database", "pg.app", f"postgres:{pg_data.name}/app", "succeeded")}

    psql(docker_client, pg_data, "postgres", "DROP DATABASE app WITH (FORCE)")
    restored = backupd(config, "restore", backup_id, "--database", "pg.app")
    assert restored.returncode == 0, restored.stderr[-800:]
    assert pg_fingerprint(docker_client, pg_data, "app") == before
    assert password not in rebuilt.stdout + rebuilt.stderr + restored.stdout + restored.stderr
