"""SQLite and Redis on the real engine, through the CLI: a live SQLite written to all through
the backup, a real redis-server; dumps proven consistent, restores with the container stopped."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import zstandard

from tests.integration.services import DB_IMAGE, TEST_LABELS, wait_until
from tests.integration.test_volumes import backupd, listing, mountpoint, write_config

pytestmark = pytest.mark.integration

APP_UID = 1000
# A writer that never pauses: every transaction adds and deletes rows and keeps a running total
# in the same transaction, so any copy of one moment has total.rows == count(*) and
# total.s == sum(n). It records each start, and exits on SIGTERM like a real service.
WRITER = r'''
import random, signal, sqlite3, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=" + sys.argv[2])
db.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB, n INTEGER)")
db.execute("CREATE TABLE IF NOT EXISTS total(k INTEGER PRIMARY KEY, rows INTEGER, s INTEGER)")
db.execute("CREATE TABLE IF NOT EXISTS starts(at REAL)")
db.execute("INSERT OR IGNORE INTO total VALUES (1, 0, 0)")
db.execute("INSERT INTO starts VALUES (?)", (time.time(),))
while True:
    db.execute("BEGIN IMMEDIATE")
    added = [random.randrange(1000) for _ in range(40)]
    db.executemany("INSERT INTO t(v, n) VALUES (randomblob(1500), ?)", [(n,) for n in added])
    gone = db.execute("SELECT count(*), coalesce(sum(n), 0) FROM (SELECT n FROM t ORDER BY id LIMIT 20)").fetchone()
    db.execute("DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 20)")
    db.execute("UPDATE total SET rows = rows + ? - ?, s = s + ? - ?", (len(added), gone[0], sum(added), gone[1]))
    db.execute("COMMIT")
    time.sleep(0.002)
'''


def consistent(path: Path) -> tuple[int, int]:
    """(rows, starts) of a database file that passes integrity_check and whose totals add up."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows, total = db.execute("SELECT count(*), coalesce(sum(n), 0) FROM t").fetchone()
        assert db.execute("SELECT rows, s FROM total").fetchone() == (rows, total), "a torn copy"
        return rows, db.execute("SELECT count(*) FROM starts").fetchone()[0]
    finally:
        db.close()


def live_rows(container, check: bool = True) -> int:
    """The writer's row count, read through SQLite as the application's user (-1 if that failed
    and not `check`: a writer that has just started may be recovering its WAL)."""
    out = container.exec_run(["python3", "-c", "import sqlite3; print(sqlite3.connect('/data/app.db', timeout=60)"
                              ".execute('SELECT rows FROM total').fetchone()[0])"], user=str(APP_UID))
    if out.exit_code != 0 and not check:
        return -1
    assert out.exit_code == 0, out.output
    return int(out.output)


@pytest.fixture(params=["wal", "delete"])
def sqlite_app(request, docker_client, volume_factory):
    """A container (uid 1000) writing /data/app.db without pause, in WAL or rollback-journal mode."""
    vol = volume_factory("sqlite")
    script = (f"chown {APP_UID}:{APP_UID} /data && exec setpriv --reuid {APP_UID} --regid {APP_UID} "
              f"--clear-groups python3 -c \"$WRITER\" /data/app.db {request.param}")
    app = docker_client.containers.run(DB_IMAGE, ["sh", "-c", script], detach=True, labels=TEST_LABELS,
                                       name=f"backupd-test-sqlite-{uuid.uuid4().hex[:8]}",
                                       environment={"WRITER": WRITER}, volumes={vol: {"bind": "/data", "mode": "rw"}})
    try:
        wait_until(lambda: app.exec_run(["test", "-s", "/data/app.db"]).exit_code == 0 and live_rows(app) > 2000,
                   "the SQLite writer", 60)
        yield app, vol
    finally:
        app.remove(force=True)


def stored_dump(tmp_path: Path, artifact: dict, into: Path) -> Path:
    [copy] = artifact["destinations"]
    raw = (tmp_path / "backups" / copy["key"]).read_bytes()
    into.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(raw))
    return into


def test_sqlite_copied_while_written_is_consistent_and_restores_with_the_app_stopped(
        docker_client, helper_image, sqlite_app, tmp_path):
    app, vol = sqlite_app
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "appdb", "type": "sqlite", "container": app.name, "path": "/data/app.db", "image": DB_IMAGE}]}})
    before = live_rows(app)
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    assert live_rows(app) > before, "the application kept writing"
    app.reload()
    assert app.status == "running"

    [art] = listing(config)[0]["artifacts"]
    assert art["kind"] == "database" and art["name"] == "appdb" and art["source"].startswith("sqlite:")
    rows, starts = consistent(stored_dump(tmp_path, art, tmp_path / "copy.db"))
    assert rows > 0 and starts == 1

    # Written after the backup: a restore must take it away.
    marked = app.exec_run(["python3", "-c", "import sqlite3; d = sqlite3.connect('/data/app.db', timeout=60); "
                           "d.execute('CREATE TABLE marker(x)'); d.commit()"], user=str(APP_UID))
    assert marked.exit_code == 0, marked.output
    refused = backupd(config, "restore", backup_id, "--database", "appdb")
    assert refused.returncode == 3 and "not empty" in refused.stderr and "--force" in refused.stderr
    started = app.attrs["State"]["StartedAt"]

    backupd(config, "restore", backup_id, "--database", "appdb", "--force", check=True)
    app.reload()
    assert app.status == "running" and app.attrs["State"]["StartedAt"] != started, "stopped and started again"
    wait_until(lambda: live_rows(app, check=False) >= 0, "the writer after the restore", 30)
    data = mountpoint(docker_client, vol)
    assert (data / "app.db").stat().st_uid == APP_UID, "the restored file belongs to the application"
    assert not [p.name for p in data.iterdir() if ".backupd-" in p.name], "no temporary file left"
    app.stop(timeout=10)  # a still file to inspect
    rows_after, starts_after = consistent(data / "app.db")
    assert starts_after == starts + 1, "the restored database is the backed-up one, started once more"
    db = sqlite3.connect(f"file:{data / 'app.db'}?mode=ro", uri=True)
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'marker'").fetchone() == (0,)
    db.close()


def test_sqlite_restore_that_fails_starts_the_app_again_and_keeps_its_file(
        docker_client, helper_image, volume_factory, tmp_path, request):
    """A dump that is not a database fails integrity_check in the helper: the live file stays, the app runs."""
    vol = volume_factory("sqlite-bad")
    app = docker_client.containers.run(
        DB_IMAGE, ["python3", "-c", "import signal, sqlite3, sys, time; signal.signal(signal.SIGTERM, "
                   "lambda *a: sys.exit(0)); d = sqlite3.connect('/data/app.db'); d.execute('CREATE TABLE IF NOT EXISTS t(x)'); "
                   "d.commit(); time.sleep(3600)"],
        detach=True, labels=TEST_LABELS, name=f"backupd-test-sqlite-{uuid.uuid4().hex[:8]}",
        volumes={vol: {"bind": "/data", "mode": "rw"}})
    request.addfinalizer(lambda: app.remove(force=True))
    wait_until(lambda: app.exec_run(["test", "-s", "/data/app.db"]).exit_code == 0, "the app's database", 30)
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "appdb", "type": "sqlite", "container": app.name, "path": "/data/app.db", "image": DB_IMAGE}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [art] = listing(config)[0]["artifacts"]
    # Forge the stored dump *and* its catalog record, so only the helper's own check can catch it.
    junk = zstandard.ZstdCompressor().compress(b"not a database" * 1000)
    path = tmp_path / "backups" / art["destinations"][0]["key"]
    path.write_bytes(junk)
    db = sqlite3.connect(tmp_path / "catalog.db")
    db.execute("UPDATE artifacts SET size = ?, sha256 = ? WHERE name = 'appdb'", (len(junk), hashlib.sha256(junk).hexdigest()))
    db.execute("DELETE FROM artifact_blocks")
    db.commit()
    db.close()
    before = (mountpoint(docker_client, vol) / "app.db").read_bytes()
    started = app.attrs["State"]["StartedAt"]

    proc = backupd(config, "restore", backup_id, "--database", "appdb", "--force")
    assert proc.returncode == 1 and "file is not a database" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    app.reload()
    assert app.status == "running" and app.attrs["State"]["StartedAt"] != started, "started again after the failure"
    assert (mountpoint(docker_client, vol) / "app.db").read_bytes() == before
    assert not [p.name for p in mountpoint(docker_client, vol).iterdir() if ".backupd-" in p.name]


def test_sqlite_helper_image_without_python_is_a_clear_error(docker_client, helper_image, sqlite_app, tmp_path):
    app, _ = sqlite_app
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "appdb", "type": "sqlite", "container": app.name, "path": "/data/app.db"}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode != 0 and "python3" in proc.stderr and helper_image in proc.stderr, proc.stderr
    assert listing(config)[0]["status"] == "failed"


REDIS_SCRIPT = ("chown redis:redis /data && exec setpriv --reuid redis --regid redis --init-groups "
                "redis-server --dir /data --requirepass \"$REDIS_PASSWORD\"")


def redis_cli(container, password: str, *words: str) -> str:
    res = container.exec_run(["redis-cli", "--no-auth-warning", "--raw", *words],
                             environment={"REDISCLI_AUTH": password})
    assert res.exit_code == 0, res.output
    return res.output.decode().strip()


@pytest.fixture
def redis_server(docker_client, volume_factory):
    vol = volume_factory("redis")
    password = uuid.uuid4().hex
    c = docker_client.containers.run(DB_IMAGE, ["sh", "-c", REDIS_SCRIPT], detach=True, labels=TEST_LABELS,
                                     name=f"backupd-test-redis-{uuid.uuid4().hex[:8]}",
                                     environment={"REDIS_PASSWORD": password},
                                     volumes={vol: {"bind": "/data", "mode": "rw"}})
    try:
        wait_until(lambda: c.exec_run(["redis-cli", "--no-auth-warning", "ping"],
                                      environment={"REDISCLI_AUTH": password}).output.strip() == b"PONG",
                   "redis-server", 30)
        redis_cli(c, password, "EVAL", "for i=1,1000 do redis.call('SET', 'key:'..i, i) end", "0")
        redis_cli(c, password, "HSET", "h", "zażółć", "✓")
        yield c, vol, password
    finally:
        c.remove(force=True)


def test_redis_dump_and_restore_with_redis_stopped(docker_client, helper_image, redis_server, tmp_path):
    c, vol, password = redis_server
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "cache", "type": "redis", "container": c.name}]}})
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    assert password not in proc.stderr
    [art] = listing(config)[0]["artifacts"]
    assert art["source"] == f"redis:{c.name}/*all" and art["status"] == "succeeded"
    assert stored_dump(tmp_path, art, tmp_path / "dump.rdb").read_bytes()[:5] == b"REDIS"
    assert password.encode() not in (tmp_path / "catalog.db").read_bytes()

    redis_cli(c, password, "FLUSHALL")
    redis_cli(c, password, "SET", "marker", "after the backup")
    refused = backupd(config, "restore", backup_id, "--database", "cache")
    assert refused.returncode == 3 and "holds 1 keys" in refused.stderr
    c.reload()
    started = c.attrs["State"]["StartedAt"]

    backupd(config, "restore", backup_id, "--database", "cache", "--force", check=True)
    c.reload()
    assert c.status == "running" and c.attrs["State"]["StartedAt"] != started
    wait_until(lambda: c.exec_run(["redis-cli", "--no-auth-warning", "ping"],
                                  environment={"REDISCLI_AUTH": password}).output.strip() == b"PONG",
               "redis-server after the restore", 30)
    assert redis_cli(c, password, "DBSIZE") == "1001"
    assert redis_cli(c, password, "GET", "key:500") == "500"
    assert redis_cli(c, password, "HGET", "h", "zażółć") == "✓"
    assert redis_cli(c, password, "EXISTS", "marker") == "0"
    rdb = mountpoint(docker_client, vol) / "dump.rdb"
    owner = c.exec_run(["id", "-u", "redis"]).output.decode().strip()
    assert str(rdb.stat().st_uid) == owner, "the file belongs to the server's user"
    assert not [p.name for p in rdb.parent.iterdir() if ".backupd-" in p.name]


def test_redis_with_appendonly_is_refused_before_anything_stops(docker_client, helper_image, redis_server, tmp_path):
    c, _, password = redis_server
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "cache", "type": "redis", "container": c.name}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    redis_cli(c, password, "CONFIG", "SET", "appendonly", "yes")
    c.reload()
    started = c.attrs["State"]["StartedAt"]
    proc = backupd(config, "restore", backup_id, "--database", "cache", "--force")
    assert proc.returncode == 3 and "appendonly yes" in proc.stderr
    c.reload()
    assert c.status == "running" and c.attrs["State"]["StartedAt"] == started


def test_redis_wrong_password_fails_the_dump_with_redis_message_and_no_password(
        docker_client, helper_image, redis_server, tmp_path):
    c, _, password = redis_server
    (tmp_path / "pw").write_text("wrong-password-1234\n")
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "cache", "type": "redis", "container": c.name, "password_file": str(tmp_path / "pw")}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    error = listing(config)[0]["error"]
    assert "WRONGPASS" in error or "NOAUTH" in error or "invalid" in error, error
    assert "wrong-password-1234" not in proc.stderr + error


def test_redis_reached_over_the_network_is_dumped_from_backupd_and_restored_into_a_container(
        docker_client, helper_image, redis_server, tmp_path):
    c, _, password = redis_server
    c.reload()
    ip = c.attrs["NetworkSettings"]["IPAddress"]
    (tmp_path / "pw").write_text(password + "\n")
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "cache", "type": "redis", "host": ip, "password_file": str(tmp_path / "pw")}]}})
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    assert "redis-cli said" not in proc.stderr, "its progress lines are no warning"
    [art] = listing(config)[0]["artifacts"]
    assert art["source"] == f"redis:{ip}:/*all"
    refused = backupd(config, "restore", backup_id, "--database", "cache")
    assert refused.returncode == 2 and "--to-container" in refused.stderr
    redis_cli(c, password, "FLUSHALL")
    backupd(config, "restore", backup_id, "--database", "cache", "--to-container", c.name, check=True)
    wait_until(lambda: c.exec_run(["redis-cli", "--no-auth-warning", "ping"],
                                  environment={"REDISCLI_AUTH": password}).output.strip() == b"PONG",
               "redis-server after the restore", 30)
    assert redis_cli(c, password, "DBSIZE") == "1001"
