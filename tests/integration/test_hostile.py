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
  2. A local user prepares the named-pipe directory backupd used to take as found
     (`$TMPDIR/backupd-fifo-<uid>`: 0777, a link to their own directory, or theirs).
  3. Secrets in hook commands (a `${VAR}` from the environment) and in hook output
     (the contents of a `*_file`): not in any log line, catalog row, manifest or
     webhook body.
  4. Another local user reads a dump: archives, manifests and the catalog are
     private even under umask 022.
  5. A helper image without GNU tar (busybox, alpine): refused by name at plan time.
  6. A tenant creates a PostgreSQL database called `globals` (or `:globals`): it is backed up
     beside the roles dump `pg:globals`, and the server's backup goes on.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.services import DB_IMAGE, TEST_LABELS, wait_until
from tests.integration.test_repository import repo_config, restic_image  # noqa: F401 - fixture
from tests.integration.test_volumes import REPO, backupd, listing, mountpoint, write_config

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


def umask_022_backupd(config: Path, *args: str, env: dict | None = None):
    """backupd as a careless operator's shell starts it: umask 022."""
    old = os.umask(0o022)
    try:
        return backupd(config, *args, env=env)
    finally:
        os.umask(old)


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
    assert artifacts["pg:globals"]["status"] == "succeeded"
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


@pytest.fixture
def pg_tenant_globals(docker_client, postgres_container):
    """A tenant's databases named like the roles dump, each with a table, and a role of our own."""
    db, role = postgres_container, f"tenant_{uuid.uuid4().hex[:12]}"
    names = ["globals", ":globals"]
    for name in names:
        pg_run(docker_client, db, "postgres", f"DROP DATABASE IF EXISTS {pg_ident(name)} WITH (FORCE)")
        pg_run(docker_client, db, "postgres", f"CREATE DATABASE {pg_ident(name)}")
        pg_run(docker_client, db, name, "CREATE TABLE t (id int PRIMARY KEY, owner text); "
                                        "INSERT INTO t SELECT g, 'tenant' FROM generate_series(1, 100) g")
    pg_run(docker_client, db, "postgres", f"CREATE ROLE {role} LOGIN")
    yield db, names, role
    for name in names:
        pg_run(docker_client, db, "postgres", f"DROP DATABASE IF EXISTS {pg_ident(name)} WITH (FORCE)")
    pg_run(docker_client, db, "postgres", f"DROP ROLE IF EXISTS {role}")


@pytest.mark.parametrize("mode", ["archive", "repository"])
def test_a_database_named_globals_is_backed_up_beside_the_roles(
        docker_client, helper_image, pg_tenant_globals, tmp_path, mode, request):
    db, names, role = pg_tenant_globals
    jobs = {"j": {"databases": [{"name": "pg", "type": "postgres", "container": db.name, "database": "all"}]}}
    if mode == "repository":
        config, _ = repo_config(tmp_path, helper_image, request.getfixturevalue("restic_image"), jobs)
    else:
        config = write_config(tmp_path, helper_image, jobs)
    before = {name: pg_table(docker_client, db, name) for name in names}

    proc = backupd(config, "backup", "j")
    assert proc.returncode == 0, proc.stderr
    backup_id = proc.stdout.strip()
    artifacts = artifacts_by_name(config)
    for name in ("pg.globals", "pg.:globals", "pg:globals"):
        assert artifacts[name]["status"] == "succeeded", artifacts[name]
    shown = backupd(config, "show", backup_id, check=True).stdout
    assert "pg.globals" in shown and "pg:globals" in shown

    for name in names:  # each tenant database comes back as itself
        pg_run(docker_client, db, "postgres", f"DROP DATABASE {pg_ident(name)} WITH (FORCE)")
        backupd(config, "restore", backup_id, "--database", f"pg.{name}", check=True)
        assert pg_table(docker_client, db, name) == before[name]
    pg_run(docker_client, db, "postgres", f"DROP ROLE {role}")  # and so do the roles
    backupd(config, "restore", backup_id, "--database", "pg:globals", check=True)
    assert pg_run(docker_client, db, "postgres", f"SELECT count(*) FROM pg_roles WHERE rolname = '{role}'") == "1"


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


# ------------------------------------------------------------------ 2. a prepared named-pipe directory


@pytest.mark.parametrize("prepared", ["0777", "link", "theirs"])
def test_a_pipe_directory_another_user_prepared_is_never_used(
        docker_client, helper_image, volume_factory, tmp_path, prepared):
    vol = volume_factory("fifo")
    (mountpoint(docker_client, vol) / "data.txt").write_text("payload\n" * 1000)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # a shared /tmp
    theirs = tmp_path / "attacker"
    theirs.mkdir(mode=0o777)
    theirs.chmod(0o777)
    predictable = tmp / f"backupd-fifo-{os.getuid()}"  # the name backupd used to take as found
    if prepared == "0777":
        predictable.mkdir()
        predictable.chmod(0o777)
        watched = predictable
    elif prepared == "link":
        predictable.symlink_to(theirs)
        watched = theirs
    else:
        predictable.mkdir(mode=0o700)
        os.chown(predictable, 54321, 54321)
        watched = predictable
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}})

    proc = backupd(config, "backup", "j", env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert "attach stream" not in proc.stderr  # the archive did travel through a named pipe
    assert list(watched.iterdir()) == [], "backupd put something in a directory another user controls"
    [backup] = listing(config)
    assert backup["status"] == "succeeded"
    # Its own pipe directory is gone with it: nothing of backupd's is left in the shared /tmp.
    assert sorted(p.name for p in tmp.iterdir()) == [predictable.name]


# ------------------------------------------------------------------ 3. secrets in hook commands and their output


class WebhookReceiver:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def run_daemon_once(config: Path, log: Path, env: dict, until, timeout: float = 100) -> str:
    """`backupd run` until `until()` holds (its job scheduled every minute), then SIGTERM; its log."""
    with open(log, "wb") as out:
        old = os.umask(0o022)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "backupd", "--log-format", "json", "--config",
                                     str(config), "run"], env={**os.environ, "PYTHONPATH": str(REPO), **env},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            os.umask(old)
        try:
            wait_until(until, "a scheduled run of the daemon", timeout)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return log.read_text(errors="replace")


def test_secrets_in_hook_commands_and_output_reach_no_log_catalog_manifest_or_webhook(
        docker_client, helper_image, volume_factory, postgres_container, webhook, tmp_path):
    db = postgres_container
    vol = volume_factory("secrets")
    (mountpoint(docker_client, vol) / "data.txt").write_text("payload\n")
    token = f"tok-{uuid.uuid4().hex}"  # reaches backupd as ${HOOK_TOKEN} in a hook command
    password_file = tmp_path / "pg_password"  # reaches backupd as a *_file; a hook prints it
    password_file.write_text(db.password + "\n")
    secrets = {"token": token, "password from a file": db.password}
    config = write_config(tmp_path, helper_image, {"j": {
        "schedule": "* * * * *",
        "volumes": [vol],
        "databases": [{"name": "pg", "type": "postgres", "container": db.name, "database": ["postgres"],
                       "password_file": str(password_file)}],
        "hooks": {
            "before": [{"command": "echo calling https://api.example/?token=${HOOK_TOKEN}; "
                                   "echo denied for ${HOOK_TOKEN} >&2; exit 7", "on_error": "continue"}],
            "after": [{"command": ["sh", "-c", f"echo password is $(cat {password_file}) >&2; exit 3"]}],
        }}}, notifications={"webhook_url": webhook.url}, scheduler={"misfire_grace": "30s"})
    env = {"HOOK_TOKEN": token}

    # Once from the CLI (its stderr), once scheduled by the daemon (its log and the webhook).
    proc = umask_022_backupd(config, "backup", "j", env=env)
    assert proc.returncode == 5, proc.stderr  # partial: the after hook failed, every artifact landed
    backup_id = proc.stdout.strip()
    daemon_log = run_daemon_once(config, tmp_path / "daemon.log", env, lambda: webhook.bodies)
    shown = backupd(config, "show", backup_id, "--json", check=True, env=env).stdout
    listed = backupd(config, "list", "--json", check=True, env=env).stdout
    manifests = [p.read_text() for p in (tmp_path / "backups").rglob("manifest.json")]
    catalog = "\n".join(sqlite3.connect(tmp_path / "catalog.db").iterdump())
    log_lines = proc.stderr.splitlines() + daemon_log.splitlines()
    assert len(manifests) == 2 and webhook.bodies and len(log_lines) > 20

    # The failures themselves are recorded and reported, only with the secrets masked.
    record = json.loads(shown)
    assert "hooks.after[0]" in record["error"] and "password is ***" in record["error"], record
    assert any("exited 7: denied for ***" in w for w in record["warnings"]), record
    assert any("token=***" in line for line in log_lines)
    body = json.loads(webhook.bodies[0])
    assert body["status"] == "partial" and "password is ***" in body["errors"][0], body
    outputs = {"CLI stderr": proc.stderr, "CLI stdout": proc.stdout, "daemon log": daemon_log, "show": shown,
               "list": listed, "catalog (sqlite dump)": catalog,
               **{f"manifest {i}": m for i, m in enumerate(manifests)},
               **{f"webhook body {i}": b.decode() for i, b in enumerate(webhook.bodies)}}
    for what, secret in secrets.items():
        for where, text in outputs.items():
            assert secret not in text, f"the {what} is in the {where}"


# ------------------------------------------------------------------ 4. files others could read


def test_archives_manifests_and_catalog_are_private_under_umask_022(
        docker_client, helper_image, volume_factory, postgres_container, tmp_path):
    vol = volume_factory("private")
    (mountpoint(docker_client, vol) / "data.txt").write_text("payload\n")
    state = tmp_path / "state"
    config = write_config(tmp_path, helper_image, {"j": {
        "volumes": [vol], "databases": [{"name": "pg", "type": "postgres",
                                         "container": postgres_container.name, "database": ["postgres"]}]}},
        catalog=f"sqlite:///{state}/catalog.db")
    proc = umask_022_backupd(config, "backup", "j")
    assert proc.returncode == 0, proc.stderr
    made = [p for p in (tmp_path / "backups").rglob("*")] + [state, *state.iterdir()]
    assert len([p for p in made if p.is_file()]) >= 4  # two archives, a manifest, the catalog
    for path in [tmp_path / "backups", *made]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {mode:04o}"


# ------------------------------------------------------------------ 5. a helper image without GNU tar


def import_image(docker_client, files: dict[str, bytes | str]) -> str:
    """An image from a few files (str: a symlink to that target), as `docker import` makes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp", "data"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o755
                tar.addfile(info, io.BytesIO(content))
    tag = f"backupd-test-busybox:{uuid.uuid4().hex[:12]}"
    docker_client.api.import_image_from_data(buf.getvalue(), repository=tag.split(":")[0], tag=tag.split(":")[1],
                                             changes=["ENV PATH=/bin", "LABEL backupd-test=1"])
    return tag


@pytest.fixture(params=["busybox tar", "no tar"])
def tarless_image(request, docker_client):
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.fail("/bin/busybox missing (busybox-static): run `bash scripts/testenv.sh install`", pytrace=False)
    applets = ["sh", "find", "ls", "cat", "rm", "true", "mkdir"] + (["tar"] if request.param == "busybox tar" else [])
    tag = import_image(docker_client, {"bin/busybox": busybox.read_bytes(),
                                       **{f"bin/{a}": "busybox" for a in applets}})
    yield request.param, tag
    docker_client.images.remove(tag, force=True)


def test_a_helper_image_without_gnu_tar_is_refused_by_name_and_the_run_recorded(
        docker_client, tarless_image, volume_factory, tmp_path):
    kind, image = tarless_image
    vol = volume_factory("tarless")
    (mountpoint(docker_client, vol) / "data.txt").write_text("payload\n")
    config = write_config(tmp_path, image, {"j": {"volumes": [vol]}})

    proc = backupd(config, "backup", "j")
    assert proc.returncode == 2, proc.stderr
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("backupd: error:")]
    assert f"helper_image: image '{image}' has no GNU tar" in error, error
    assert ("tar (busybox)" if kind == "busybox tar" else "cannot run") in error, error
    assert "FROM debian:bookworm-slim" in error and "named pipe" not in error
    [run] = listing(config)
    assert run["status"] == "failed" and "has no GNU tar" in run["error"] and run["artifacts"] == []
    assert not (tmp_path / "backups").exists() or not any((tmp_path / "backups").rglob("*.tar*"))
