"""Hostile input against real services, one section per threat.

Each section names the threat, sets up what an attacker controls (and only
that), runs backupd through its CLI as an operator would, and asserts both
that the attack got nothing and that the legitimate work still happened.

Threats covered:
  1. Database names read as connection strings or options (issue 14): a user who
     can CREATE DATABASE names one `host=<their server>` (or `-h<their server>`)
     and waits for backupd's password; names with spaces, slashes, quotes,
     backticks or a leading '-' must still be listed, dumped and restored as
     themselves.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.services import DB_IMAGE, TEST_LABELS, wait_until
from tests.integration.test_volumes import backupd, listing, write_config

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ the attacker's server
# A container on the same bridge as the databases, listening where a hijacked tool would
# connect (PostgreSQL's and MySQL's default ports). It logs every connection it accepts.

TRAP_PORTS = (5432, 3306)
TRAP_SCRIPT = """
import socket, sys, threading

def serve(port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    while True:
        conn, peer = listener.accept()
        print(f"accept {port} {peer[0]}", flush=True)
        conn.settimeout(2)
        got = 0
        try:
            while chunk := conn.recv(65536):
                got += len(chunk)
        except OSError:
            pass
        print(f"closed {port} {peer[0]} {got} bytes", flush=True)
        conn.close()

for port in map(int, sys.argv[1:]):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@dataclass
class Trap:
    container: object
    ip: str

    def log(self) -> list[str]:
        return self.container.logs(stdout=True, stderr=True).decode(errors="replace").splitlines()

    def accepted(self) -> int:
        return sum(line.startswith("accept ") for line in self.log())


@pytest.fixture(scope="module")
def trap(docker_client):
    container = docker_client.containers.run(
        DB_IMAGE, ["python3", "-c", TRAP_SCRIPT, *map(str, TRAP_PORTS)], detach=True,
        name=f"backupd-test-trap-{uuid.uuid4().hex[:12]}", labels=TEST_LABELS)
    try:
        wait_until(lambda: "ready" in container.logs().decode(), "trap listener", 30)
        container.reload()
        yield Trap(container, container.attrs["NetworkSettings"]["IPAddress"])
    finally:
        container.remove(force=True)


def reach_trap_from(docker_client, container_name: str, trap: Trap, port: int) -> None:
    """The control: the database container can reach the trap, so silence below means something."""
    before = trap.accepted()
    probe = (f"import socket; s = socket.create_connection(('{trap.ip}', {port}), 5); "
             "s.sendall(b'probe'); s.close()")
    res = docker_client.containers.get(container_name).exec_run(["python3", "-c", probe])
    assert res.exit_code == 0, res.output.decode(errors="replace")
    wait_until(lambda: trap.accepted() > before, f"trap to see the probe from {container_name}", 15)


def reach_trap_from_here(trap: Trap, port: int) -> None:
    """The control for tools that run in backupd itself (`host:` entries)."""
    before = trap.accepted()
    with socket.create_connection((trap.ip, port), 5) as s:
        s.sendall(b"probe")
    wait_until(lambda: trap.accepted() > before, "trap to see the probe from the test host", 15)


def assert_trap_untouched(trap: Trap, baseline: int) -> None:
    time.sleep(1)  # a connection made at the very end still shows up
    new = [line for line in trap.log() if line.startswith("accept ")][baseline:]
    assert not new, f"a tool connected to the attacker's server: {new}"


def artifacts_by_name(config: Path) -> dict[str, dict]:
    [backup] = listing(config)
    return {a["name"]: a for a in backup["artifacts"]}


def assert_one_plain_file_each(tmp_path: Path, artifacts: dict[str, dict]) -> None:
    """Every artifact is one object directly under <job>/<id>/, whatever its name holds."""
    for art in artifacts.values():
        [copy] = art["destinations"]
        assert copy["status"] == "stored", art
        path = tmp_path / "backups" / copy["key"]
        assert path.is_file() and path.parent.parent.parent == tmp_path / "backups", copy["key"]


# ------------------------------------------------------------------ 1. database names as connection strings or options


def pg_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pg_run(docker_client, db, database: str, sql: str) -> str:
    """psql with the database given as a conninfo value (the test's own tooling must not be fooled either)."""
    quoted = "'" + database.replace("\\", "\\\\").replace("'", "\\'") + "'"
    res = docker_client.containers.get(db.name).exec_run(
        ["psql", f"--dbname=dbname={quoted} user='postgres'", "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql])
    assert res.exit_code == 0, res.output.decode(errors="replace")
    return res.output.decode().strip()


def pg_hostile_names(trap: Trap) -> list[str]:
    return [
        f"host={trap.ip}",                             # one word: libpq's keyword form
        f"host={trap.ip} port=5432 sslmode=disable",
        f"postgresql://postgres@{trap.ip}:5432/x",     # URI form
        f"-h{trap.ip}",                                # an option, where a tool takes operands
        "two words", "a/b", "it's", "back\\slash", 'dq"x', "zażółć 日本語 🐘", "-x", "*globals",
    ]


@pytest.fixture
def pg_hostile(docker_client, postgres_container, trap):
    """The hostile databases, each with a table t of a few rows named after it."""
    db = postgres_container
    names = pg_hostile_names(trap)
    for name in names:
        pg_run(docker_client, db, "postgres", f"DROP DATABASE IF EXISTS {pg_ident(name)} WITH (FORCE)")
        pg_run(docker_client, db, "postgres", f"CREATE DATABASE {pg_ident(name)}")
        literal = "'" + name.replace("'", "''") + "'"
        pg_run(docker_client, db, name, f"CREATE TABLE t (id int PRIMARY KEY, owner text); "
                                        f"INSERT INTO t SELECT g, {literal} FROM generate_series(1, 100) g")
    yield db, names
    for name in names:
        pg_run(docker_client, db, "postgres", f"DROP DATABASE IF EXISTS {pg_ident(name)} WITH (FORCE)")


def pg_table(docker_client, db, name: str) -> str:
    return pg_run(docker_client, db, name, "SELECT count(*), min(owner), max(owner) FROM t")


@pytest.mark.parametrize("mode", ["container", "network"])
def test_postgres_names_never_reach_libpq_as_connection_strings(
        docker_client, helper_image, pg_hostile, trap, tmp_path, mode):
    db, names = pg_hostile
    reach_trap_from(docker_client, db.name, trap, 5432)
    reach_trap_from_here(trap, 5432)
    baseline = trap.accepted()
    before = {name: pg_table(docker_client, db, name) for name in names}
    where = {"container": db.name} if mode == "container" else {"host": db.ip, "password": db.password}
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "database": "all", **where}]}})

    proc = backupd(config, "backup", "j")
    assert_trap_untouched(trap, baseline)
    assert proc.returncode == 0, proc.stderr
    backup_id = proc.stdout.strip()
    assert db.password not in proc.stderr

    artifacts = artifacts_by_name(config)
    for name in names:  # each database is its own artifact, found by its own name
        art = artifacts[f"pg.{name}"]
        assert art["status"] == "succeeded" and art["size"] > 0, art
    assert artifacts["pg.globals"]["status"] == "succeeded"
    assert "pg.two" not in artifacts and "pg.words" not in artifacts
    assert_one_plain_file_each(tmp_path, artifacts)

    # Restore into fresh databases (dropped first, so restore creates them): createdb,
    # pg_restore and psql each get the name.
    for name in (f"host={trap.ip}", f"-h{trap.ip}", "a/b", "it's", "*globals"):
        pg_run(docker_client, db, "postgres", f"DROP DATABASE {pg_ident(name)} WITH (FORCE)")
        backupd(config, "restore", backup_id, "--database", f"pg.{name}", check=True)
        assert pg_table(docker_client, db, name) == before[name]
    # An existing, non-empty one is refused by name, then replaced with --force.
    refused = backupd(config, "restore", backup_id, "--database", "pg.two words")
    assert refused.returncode == 3 and "'two words'" in refused.stderr
    pg_run(docker_client, db, "two words", "DELETE FROM t")
    backupd(config, "restore", backup_id, "--database", "pg.two words", "--force", check=True)
    assert pg_table(docker_client, db, "two words") == before["two words"]
    assert_trap_untouched(trap, baseline)


def test_postgres_explicit_hostile_names_are_dumped_as_themselves(
        docker_client, helper_image, pg_hostile, trap, tmp_path):
    db, names = pg_hostile
    baseline = trap.accepted()
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "container": db.name, "database": names[:5]}]}})
    proc = backupd(config, "backup", "j")
    assert_trap_untouched(trap, baseline)
    assert proc.returncode == 0, proc.stderr
    assert sorted(artifacts_by_name(config)) == sorted(f"pg.{n}" for n in names[:5])


def test_a_name_no_tool_can_take_is_refused_naming_the_key_path(helper_image, postgres_container, tmp_path):
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "pg", "type": "postgres", "container": postgres_container.name,
         "database": ["postgres", "bad\u0000name"]}]}})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 2
    assert "jobs.j.databases[0].database[1]: database 'bad\\x00name'" in proc.stderr and "NUL" in proc.stderr
    [failed] = listing(config)  # recorded failed with its cause; nothing was dumped
    assert failed["status"] == "failed" and failed["artifacts"] == [] and "NUL" in failed["error"]


def maria_ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def maria_run(docker_client, db, sql: str) -> str:
    res = docker_client.containers.get(db.name).exec_run(
        ["mariadb", "--user=root", "-N", "-B", "--default-character-set=utf8mb4", "-e", sql],
        environment={"MYSQL_PWD": db.password})
    assert res.exit_code == 0, res.output.decode(errors="replace")
    return res.output.decode().strip()


def maria_hostile_names(trap: Trap) -> list[str]:
    return [f"-h{trap.ip}", "--help", "-x", "two words", "a`b", "it's", "a/b", "back\\slash", "zażółć 日本"]


@pytest.fixture
def maria_hostile(docker_client, mariadb_container, trap):
    db = mariadb_container
    names = maria_hostile_names(trap)
    for name in names:
        literal = "'" + name.replace("\\", "\\\\").replace("'", "''") + "'"
        maria_run(docker_client, db, f"DROP DATABASE IF EXISTS {maria_ident(name)}; "
                                     f"CREATE DATABASE {maria_ident(name)} CHARACTER SET utf8mb4; "
                                     f"CREATE TABLE {maria_ident(name)}.t (id INT PRIMARY KEY, owner VARCHAR(100)); "
                                     f"USE {maria_ident(name)}; INSERT INTO t SELECT seq, {literal} FROM seq_1_to_100")
    yield db, names
    maria_run(docker_client, db, "; ".join(f"DROP DATABASE IF EXISTS {maria_ident(n)}" for n in names))


def maria_table(docker_client, db, name: str) -> str:
    return maria_run(docker_client, db, f"SELECT COUNT(*), MIN(owner), MAX(owner) FROM {maria_ident(name)}.t")


def test_mariadb_names_are_never_read_as_options(docker_client, helper_image, maria_hostile, trap, tmp_path):
    db, names = maria_hostile
    reach_trap_from(docker_client, db.name, trap, 3306)
    baseline = trap.accepted()
    before = {name: maria_table(docker_client, db, name) for name in names}
    config = write_config(tmp_path, helper_image, {"j": {"databases": [
        {"name": "maria", "type": "mariadb", "container": db.name, "database": names},
        {"name": "everything", "type": "mariadb", "container": db.name, "database": "all"}]}})

    proc = backupd(config, "backup", "j")
    assert_trap_untouched(trap, baseline)
    assert proc.returncode == 0, proc.stderr
    backup_id = proc.stdout.strip()

    artifacts = artifacts_by_name(config)
    assert sorted(artifacts) == sorted([*(f"maria.{n}" for n in names), "everything"])
    assert all(a["status"] == "succeeded" for a in artifacts.values()), artifacts
    assert_one_plain_file_each(tmp_path, artifacts)

    for name in (f"-h{trap.ip}", "two words", "a`b", "a/b"):
        maria_run(docker_client, db, f"DROP DATABASE {maria_ident(name)}")
        backupd(config, "restore", backup_id, "--database", f"maria.{name}", check=True)
        assert maria_table(docker_client, db, name) == before[name]
    refused = backupd(config, "restore", backup_id, "--database", "maria.it's")
    assert refused.returncode == 3 and "\"it's\"" in refused.stderr
    assert_trap_untouched(trap, baseline)
