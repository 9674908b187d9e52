"""Quiescing against real PostgreSQL 15 and MariaDB containers: dumps, restores,
stopped containers that always come back, and hooks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.services import APP_COMMAND, remove_db, start_mariadb, start_postgres
from tests.integration.test_volumes import (
    REPO,
    backupd,
    broken_helper,  # noqa: F401 - fixture
    listing,
    mountpoint,
    write_config,
)

pytestmark = pytest.mark.integration

PG_ROWS = """
CREATE TABLE t (id int PRIMARY KEY, txt text, n numeric);
INSERT INTO t SELECT g, 'zażółć gęślą jaźń ✓ 日本語 ' || g, g * 1.5 FROM generate_series(1, 200000) g;
CREATE TABLE other (k text PRIMARY KEY);
INSERT INTO other VALUES ('ünïcödé'), ('emoji 🐘');
"""


def psql(docker_client, db, database: str, sql: str) -> str:
    c = docker_client.containers.get(db.name)
    res = c.exec_run(["psql", "-U", "postgres", "-d", database, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql],
                     environment={"PGPASSWORD": db.password})
    assert res.exit_code == 0, res.output.decode()
    return res.output.decode().strip()


def pg_fingerprint(docker_client, db, database: str) -> tuple[str, str, str]:
    """Row-by-row digest of every table, so 'equal' means every row and value."""
    return (psql(docker_client, db, database, "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM t"),
            psql(docker_client, db, database, "SELECT md5(string_agg(o::text, '|' ORDER BY k)) FROM other o"),
            psql(docker_client, db, database, "SELECT count(*) FROM t"))


def maria(docker_client, db, sql: str) -> str:
    c = docker_client.containers.get(db.name)
    res = c.exec_run(["mariadb", "-uroot", "-N", "-B", "--default-character-set=utf8mb4", "-e", sql],
                     environment={"MYSQL_PWD": db.password})
    assert res.exit_code == 0, res.output.decode()
    return res.output.decode().strip()


@pytest.fixture(scope="module")
def pg_data(docker_client, postgres_container):
    for name in ("app", "shop"):
        psql(docker_client, postgres_container, "postgres", f"DROP DATABASE IF EXISTS {name}")
        psql(docker_client, postgres_container, "postgres", f"CREATE DATABASE {name}")
        c = docker_client.containers.get(postgres_container.name)
        res = c.exec_run(["psql", "-U", "postgres", "-d", name, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", PG_ROWS],
                         environment={"PGPASSWORD": postgres_container.password})
        assert res.exit_code == 0, res.output
    psql(docker_client, postgres_container, "postgres",
         "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='reporter') THEN CREATE ROLE reporter LOGIN; END IF; END$$")
    return postgres_container


def test_postgres_all_databases_dump_drop_restore_row_by_row(docker_client, helper_image, pg_data, tmp_path):
    db = pg_data
    before = {name: pg_fingerprint(docker_client, db, name) for name in ("app", "shop")}
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "container": db.name, "database": "all"}]}})
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    names = sorted(a["name"] for a in listing(config)[0]["artifacts"])
    assert names == ["pg.app", "pg.postgres", "pg.shop", "pg:globals"]
    assert all(a["kind"] == "database" for a in listing(config)[0]["artifacts"])
    assert db.password not in proc.stderr

    psql(docker_client, db, "postgres", "DROP DATABASE app WITH (FORCE)")
    backupd(config, "restore", backup_id, "--database", "pg.app", check=True)
    assert pg_fingerprint(docker_client, db, "app") == before["app"]

    refused = backupd(config, "restore", backup_id, "--database", "pg.shop")
    assert refused.returncode == 3 and "not empty" in refused.stderr and "--force" in refused.stderr
    psql(docker_client, db, "shop", "DELETE FROM other")
    backupd(config, "restore", backup_id, "--database", "pg.shop", "--force", check=True)
    assert pg_fingerprint(docker_client, db, "shop") == before["shop"]

    second = start_postgres(docker_client)
    try:
        backupd(config, "restore", backup_id, "--database", "pg:globals", "--to-container", second.name, check=True)
        backupd(config, "restore", backup_id, "--database", "pg.app", "--to-container", second.name, check=True)
        assert pg_fingerprint(docker_client, second, "app") == before["app"]
        assert psql(docker_client, second, "postgres", "SELECT count(*) FROM pg_roles WHERE rolname='reporter'") == "1"
    finally:
        remove_db(docker_client, second)


def test_postgres_single_database_with_password_file(docker_client, helper_image, pg_data, tmp_path):
    secret = tmp_path / "pgpass"
    secret.write_text(pg_data.password + "\n")
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "appdb", "type": "postgresql", "container": pg_data.name, "database": "app",
         "user": "postgres", "password_file": str(secret)}]}})
    backupd(config, "backup", "j", check=True)
    [art] = listing(config)[0]["artifacts"]
    assert art["name"] == "appdb" and art["size"] > 1000


def test_network_dump_from_backupd_itself(docker_client, helper_image, pg_data, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "net", "type": "postgres", "host": pg_data.ip, "port": 5432, "database": "shop",
         "password": pg_data.password}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [art] = listing(config)[0]["artifacts"]
    assert art["name"] == "net" and art["status"] == "succeeded"
    assert backupd(config, "verify", backup_id, check=True).stdout.startswith("ok")


def test_wrong_password_fails_the_dump_with_the_tools_message_and_no_password(
        docker_client, helper_image, pg_data, tmp_path):
    """Over the network the server checks the password (its local socket trusts)."""
    wrong = "not-the-password-" + uuid.uuid4().hex
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "host": pg_data.ip, "database": "app", "password": wrong}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    assert wrong not in proc.stderr and wrong not in str(listing(config))


@pytest.mark.parametrize("where", ["container", "host"])
def test_a_dump_that_outlasts_its_timeout_is_killed_and_fails_the_artifact(
        docker_client, helper_image, pg_data, tmp_path, where):
    """pg_dump waits forever for a lock held by a long transaction: the entry's timeout ends it."""
    db = docker_client.containers.get(pg_data.name)
    locker = db.exec_run(["psql", "-U", "postgres", "-d", "app", "-c",
                          "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(40); COMMIT;"], detach=True)
    assert locker is not None
    time.sleep(1)
    entry = {"name": "pg", "type": "postgres", "database": "app", "timeout": "3s",
             **({"container": pg_data.name} if where == "container" else
                {"host": pg_data.ip, "password": pg_data.password})}
    config = write_config(tmp_path, helper_image, {"j": {"databases": [entry]}})
    started = time.monotonic()
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 30, "the timeout was not enforced"
    [backup] = listing(config)
    [art] = backup["artifacts"]
    assert backup["status"] == "failed" and art["status"] == "failed"
    assert "pg_dump in " in art["error"] and "timed out after 3s" in art["error"], art["error"]
    # the lock holder is gone by the end of the test module's next use of the table
    db.exec_run(["psql", "-U", "postgres", "-d", "app", "-c",
                 "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(40)%' "
                 "AND pid <> pg_backend_pid()"])


def test_missing_database_is_an_error_before_anything_runs(docker_client, helper_image, pg_data, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "container": pg_data.name, "database": ["app", "nope"]}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 2
    assert "jobs.j.databases[0].database[1]: database 'nope' does not exist" in proc.stderr
    [failed] = listing(config)  # recorded failed, with its cause, and nothing dumped
    assert failed["status"] == "failed" and failed["artifacts"] == []
    assert "planning failed" in failed["error"] and "'nope' does not exist" in failed["error"]


def test_mariadb_dump_drop_restore_and_into_a_second_container(
        docker_client, helper_image, mariadb_container, tmp_path):
    db = mariadb_container
    maria(docker_client, db, "DROP DATABASE IF EXISTS shop; CREATE DATABASE shop CHARACTER SET utf8mb4; "
          "CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(100), data BLOB); "
          "USE shop; INSERT INTO shop.items VALUES (1, 'zażółć ✓ 日本語', X'00FF10'), (2, 'plain', NULL); "
          "INSERT INTO shop.items SELECT seq + 10, CONCAT('row ', seq), UNHEX(MD5(seq)) FROM seq_1_to_50000; "
          "CREATE TRIGGER shop.trg BEFORE INSERT ON shop.items FOR EACH ROW SET NEW.name = NEW.name; "
          "CREATE PROCEDURE shop.p() SELECT 1;")
    digest_sql = "SELECT MD5(GROUP_CONCAT(id, name, HEX(COALESCE(data, '')) ORDER BY id SEPARATOR '|')), COUNT(*) FROM shop.items"
    maria(docker_client, db, "SET SESSION group_concat_max_len = 100000000")
    before = maria(docker_client, db, f"SET SESSION group_concat_max_len = 100000000; {digest_sql}")
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "maria", "type": "mariadb", "container": db.name, "database": ["shop"]}]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    maria(docker_client, db, "DROP DATABASE shop")
    backupd(config, "restore", backup_id, "--database", "maria.shop", check=True)
    assert maria(docker_client, db, f"SET SESSION group_concat_max_len = 100000000; {digest_sql}") == before
    assert maria(docker_client, db, "SELECT COUNT(*) FROM information_schema.routines WHERE routine_schema='shop'") == "1"
    assert backupd(config, "restore", backup_id, "--database", "maria.shop").returncode == 3

    second = start_mariadb(docker_client)
    try:
        backupd(config, "restore", backup_id, "--database", "maria.shop", "--to-container", second.name, check=True)
        assert maria(docker_client, second, f"SET SESSION group_concat_max_len = 100000000; {digest_sql}") == before
    finally:
        remove_db(docker_client, second)


def test_mariadb_all_databases(docker_client, helper_image, mariadb_container, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "everything", "type": "mysql", "container": mariadb_container.name, "database": "all"}]}})
    backupd(config, "backup", "j", check=True)
    [art] = listing(config)[0]["artifacts"]
    assert art["name"] == "everything" and art["status"] == "succeeded"


@pytest.fixture
def app_container(docker_client, helper_image, volume_factory):
    vol = volume_factory("appdata")
    (mountpoint(docker_client, vol) / "state").write_text("app state")
    app = docker_client.containers.run(helper_image, APP_COMMAND, detach=True, name=f"app-{uuid.uuid4().hex[:8]}",
                                       volumes={vol: {"bind": "/data", "mode": "rw"}})
    yield app, vol
    app.remove(force=True)


def test_stopped_container_is_started_again_after_success(docker_client, helper_image, app_container, tmp_path):
    app, vol = app_container
    started = app.attrs["State"]["StartedAt"]
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "stop_containers": [app.name]}})
    proc = backupd(config, "backup", "j", check=True)
    app.reload()
    assert app.status == "running" and app.attrs["State"]["StartedAt"] != started
    steps = [proc.stderr.index(f"step {i}/6") for i in range(1, 7)]
    assert steps == sorted(steps), "steps must run and be logged in order"


def test_stopped_container_is_started_again_after_a_failed_archive(
        docker_client, broken_helper, app_container, tmp_path):
    app, vol = app_container
    config = write_config(tmp_path, broken_helper, {"j": {"volumes": [vol], "stop_containers": [app.name]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    app.reload()
    assert app.status == "running"
    assert listing(config)[0]["status"] == "failed"


def test_container_left_stopped_by_sigkill_is_started_at_next_start(
        docker_client, helper_image, app_container, volume_factory, tmp_path):
    app, vol = app_container
    with open(mountpoint(docker_client, vol) / "big.bin", "wb") as f:
        for _ in range(500):
            f.write(os.urandom(1 << 20))
    small = volume_factory("small")
    config = write_config(tmp_path, helper_image, {
        "slow": {"volumes": [vol], "stop_containers": [app.name], "compression": {"level": 19}},
        "quick": {"volumes": [small]}})
    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "slow"],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        app.reload()
        if app.status == "exited":
            break
        assert proc.poll() is None and time.monotonic() < deadline, "backup never stopped the container"
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    app.reload()
    assert app.status == "exited", "SIGKILL cannot restart anything: the next start must"

    backupd(config, "backup", "quick", check=True)
    app.reload()
    assert app.status == "running"
    slow = [b for b in listing(config) if b["job"] == "slow"][0]
    assert slow["status"] == "failed" and "interrupted" in slow["error"]


def test_hooks_run_in_order_and_after_hooks_run_even_when_the_backup_failed(
        docker_client, helper_image, pg_data, volume_factory, tmp_path):
    vol = volume_factory("hooks")
    marker = f"/tmp/after-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "hooks": {
        "before": [{"command": ["sh", "-c", "echo before-ran; exit 3"], "container": pg_data.name}],
        "after": [{"command": f"echo after-ran > {marker}", "container": pg_data.name}]}}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert "hooks.before[0]" in proc.stderr and "exited 3" in proc.stderr and "before-ran" in proc.stderr
    [entry] = listing(config)
    assert entry["status"] == "failed" and entry["artifacts"] == []  # nothing archived after a failed before-hook
    out = docker_client.containers.get(pg_data.name).exec_run(["cat", marker]).output
    assert out.strip() == b"after-ran"


@pytest.mark.parametrize("on_error,expected_status", [("fail", "failed"), ("continue", "succeeded")])
def test_hook_timeout_is_enforced_both_ways(
        docker_client, helper_image, pg_data, volume_factory, tmp_path, on_error, expected_status):
    vol = volume_factory("timeout")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "hooks": {"before": [
        {"command": ["sleep", "60"], "container": pg_data.name, "timeout": "2s", "on_error": on_error}]}}})
    started = time.monotonic()
    proc = backupd(config, "backup", "j")
    assert time.monotonic() - started < 30
    assert "timed out after 2s" in proc.stderr
    [backup] = listing(config)
    assert backup["status"] == expected_status
    assert (proc.returncode == 0) == (expected_status == "succeeded")
    if on_error == "continue":  # not thrown away: a warning on the run
        assert len(backup["warnings"]) == 1 and "hooks.before[0]" in backup["warnings"][0]
        assert "timed out after 2s" in backup["warnings"][0]
    ps = docker_client.containers.get(pg_data.name).exec_run(["sh", "-c", "ps -eo args 2>/dev/null || ls /proc"]).output
    assert b"sleep 60" not in ps, "the timed-out hook is still running"


def test_a_container_on_anothers_network_restarts_after_it_is_healthy(
        docker_client, helper_image, volume_factory, tmp_path):
    """network_mode: service:vpn (container:<id> on the engine): vpn stops last, starts first,
    and its dependent starts only once vpn's healthcheck passes."""
    vol = volume_factory("netshare")
    ready = "sleep 3; touch /run/ready; trap 'exit 0' TERM; while :; do sleep 1; done"
    vpn = docker_client.containers.run(
        helper_image, ["sh", "-c", ready], detach=True, name=f"vpn-{uuid.uuid4().hex[:8]}", tmpfs={"/run": ""},
        healthcheck={"test": ["CMD", "test", "-f", "/run/ready"], "interval": 500_000_000, "retries": 30})
    client = docker_client.containers.run(helper_image, APP_COMMAND, detach=True,
                                          name=f"client-{uuid.uuid4().hex[:8]}", network_mode=f"container:{vpn.id}")
    try:
        config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol],
                                                             "stop_containers": [vpn.name, client.name]}})
        proc = backupd(config, "backup", "j", check=True)
        assert proc.stderr.index(f"stopping container {client.name}") < proc.stderr.index(
            f"stopping container {vpn.name}")
        for c in (vpn, client):
            c.reload()
            assert c.status == "running", c.name
        started = {c.name: c.attrs["State"]["StartedAt"] for c in (vpn, client)}
        from datetime import datetime

        def when(text: str) -> datetime:
            return datetime.fromisoformat(text[:26].rstrip("Z"))

        assert (when(started[client.name]) - when(started[vpn.name])).total_seconds() >= 2.5, started
    finally:
        client.remove(force=True)
        vpn.remove(force=True)
