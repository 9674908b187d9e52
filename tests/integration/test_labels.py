"""Jobs declared by container labels, on the real engine, the way users run backupd:

- `backupd run` protects a labelled container started after it, without a reload (the event
  stream adds the job; /healthz shows it at once), backs it up on the discovery schedule, and
  drops the job when the container goes;
- a container with a bad label is reported (log, `list --jobs`, a failed run naming the
  container and the label) while the other jobs still run;
- `backupd.database=postgres|mariadb` labels dump real databases; `list --jobs --json` says
  where every setting came from and never shows a password;
- real Compose labels: one job per Compose project, `backupd.stop` stops and restarts the
  service around the copy.

Everything a test makes carries a label of its own run, and is removed by it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.integration.services import APP_COMMAND, DB_IMAGE, MARIADB_SCRIPT, PG_DATA, PG_SCRIPT, TEST_LABELS, \
    require_image
from tests.integration.test_daemon import Daemon, wait_until
from tests.integration.test_sidecar import Webhook, webhook  # noqa: F401 - fixture
from tests.integration.test_volumes import backupd, listing, mountpoint

pytestmark = pytest.mark.integration

RUN_LABEL = "backupd-test-labels"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Made:
    """Containers and volumes of one test, all labelled with its run id; removed by that label."""

    def __init__(self, client: Any, helper_image: str) -> None:
        self.client = client
        self.helper_image = helper_image
        self.run = uuid.uuid4().hex[:8]
        self.labels = {**TEST_LABELS, RUN_LABEL: self.run}

    def container(self, name: str, labels: dict[str, str], volumes: dict[str, str] | None = None,
                  image: str | None = None, command: Any = None, **kwargs: Any) -> Any:
        for volume in volumes or {}:
            self.client.volumes.create(volume, labels=self.labels)
        return self.client.containers.run(
            image or self.helper_image, command or APP_COMMAND, name=name, detach=True,
            labels={**self.labels, **labels},
            volumes={v: {"bind": path, "mode": "rw"} for v, path in (volumes or {}).items()}, **kwargs)

    def clean(self) -> None:
        selector = {"label": f"{RUN_LABEL}={self.run}"}
        for container in self.client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
        for volume in self.client.volumes.list(filters=selector):
            volume.remove(force=True)


@pytest.fixture
def made(docker_client, helper_image) -> Iterator[Made]:
    m = Made(docker_client, helper_image)
    yield m
    m.clean()


def write(tmp_path: Path, helper_image: str, jobs: dict | None = None, notifications: dict | None = None,
          **discovery: Any) -> Path:
    config = {"catalog": f"sqlite:///{tmp_path}/catalog.db", "helper_image": helper_image,
              "destinations": {"local": {"type": "local", "path": str(tmp_path / "backups")}},
              "jobs": jobs or {}, "discovery": {"enabled": True, **discovery},
              **({"notifications": notifications} if notifications else {})}
    path = tmp_path / "backupd.yml"
    path.write_text(json.dumps(config))
    return path


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 still carries the report
        return json.loads(exc.read())
    except OSError:
        return {}


def jobs_listing(config: Path) -> dict[str, dict]:
    proc = backupd(config, "list", "--jobs", "--json", check=True)
    return {row["job"]: row for row in json.loads(proc.stdout)}


def fill(container: Any, path: str, text: str) -> None:
    res = container.exec_run(["sh", "-c", f"printf '%s' '{text}' > {path}"])
    assert res.exit_code == 0, res.output


def test_the_daemon_protects_a_container_started_after_it_and_a_bad_label_breaks_only_its_own_job(
        tmp_path: Path, made: Made, volume_factory: Callable[..., str]) -> None:
    good, bad, configured = f"lbl-{made.run}", f"bad-{made.run}", f"cfg-{made.run}"
    configured_volume = volume_factory("cfg")
    config = write(tmp_path, made.helper_image, schedule="* * * * *",
                   jobs={configured: {"schedule": "* * * * *", "volumes": [configured_volume]}})
    made.container(f"{bad}-app", {"backupd.enable": "true", "backupd.job": bad, "backupd.stop": "maybe"},
                   {f"{bad}-data": "/data"})
    port = free_port()
    daemon = Daemon(config, tmp_path / "daemon.log", "--http", f"127.0.0.1:{port}")
    try:
        wait_until(lambda: configured in health(port).get("jobs", {}), "the daemon's /healthz", 30, daemon.text)
        assert good not in health(port)["jobs"] and bad not in health(port)["jobs"]

        # a container started now is protected without a reload: the event stream adds its job
        app = made.container(f"{good}-app", {"backupd.enable": "true", "backupd.job": good},
                             {f"{good}-data": "/data"})
        fill(app, "/data/marker", "protected by a label")
        wait_until(lambda: good in health(port).get("jobs", {}), "the labelled job in /healthz", 20, daemon.text)
        assert "container labels changed" in daemon.text()
        # the bad label: logged naming the container and the label, its job not scheduled
        logged = [json.loads(line) for line in daemon.text().splitlines() if line.startswith("{")]
        assert any(f"'{bad}-app'" in e.get("message", "") and "backupd.stop" in e.get("message", "")
                   and e.get("level") in ("error", "ERROR") for e in logged), daemon.text()[-3000:]
        assert bad not in health(port)["jobs"]
        assert any(f"'{bad}-app', label backupd.stop" in e for e in health(port)["discovery"]["label_errors"])

        def succeeded() -> dict[str, dict]:
            done = {b["job"]: b for b in listing(config) if b["status"] == "succeeded"}
            return done if {good, configured} <= set(done) else {}

        done = wait_until(succeeded, "scheduled backups of the labelled and the configured job", 150, daemon.text)
        (artifact,) = done[good]["artifacts"]
        assert (artifact["kind"], artifact["name"]) == ("volume", f"{good}-data")

        # the broken job, asked for by name: a typed error naming the container and the label,
        # recorded as a failed run (so notifications and /healthz see it)
        proc = backupd(config, "backup", bad)
        assert proc.returncode == 2, proc.stderr
        assert f"container '{bad}-app', label backupd.stop: 'maybe' is not true or false" in proc.stderr
        failed = [b for b in listing(config) if b["job"] == bad]
        assert [b["status"] for b in failed] == ["failed"]
        row = jobs_listing(config)[bad]
        assert row["origin"] == "labels" and "backupd.stop" in row["error"] and row["containers"] == [f"{bad}-app"]

        # the container goes: so does its job
        app.remove(force=True)
        wait_until(lambda: good not in health(port).get("jobs", {"x": 1}), "the job removed from /healthz", 20,
                   daemon.text)
        assert configured in health(port)["jobs"]
    finally:
        stopped = time.monotonic()
        daemon.stop(signal.SIGTERM)
    assert daemon.proc.returncode == 0
    assert time.monotonic() - stopped < 30
    assert "event stream did not close" not in daemon.text()


def test_a_broken_label_reaches_the_webhook_once_naming_the_container_and_label_and_no_secret(
        tmp_path: Path, made: Made, webhook: Webhook) -> None:
    bad, good = f"bad-{made.run}", f"lbl-{made.run}"
    secret = f"pw-{uuid.uuid4().hex}"
    config = write(tmp_path, made.helper_image, schedule="0 3 * * *", notifications={"webhook_url": webhook.url})
    made.container(f"{bad}-db", {"backupd.enable": "true", "backupd.job": bad, "backupd.database": "postgres",
                                 "backupd.database.password": secret}, {f"{bad}-data": "/data"})
    port = free_port()
    daemon = Daemon(config, tmp_path / "daemon.log", "--http", f"127.0.0.1:{port}")

    def label_errors() -> list[dict[str, Any]]:
        return [body for _, body in list(webhook.posts) if body.get("status") == "label-error"]

    try:
        [body] = wait_until(label_errors, "the webhook on the broken label", 30, daemon.text)
        assert (body["job"], body["container"], body["label"]) == (bad, f"{bad}-db", "backupd.database.password")
        assert f"container '{bad}-db', label backupd.database.password" in body["errors"][0]
        assert secret not in json.dumps(webhook.posts) and secret not in daemon.text()

        # more container events (a new labelled container, discovery reads every label again):
        # the same breakage is not sent again
        made.container(f"{good}-app", {"backupd.enable": "true", "backupd.job": good}, {f"{good}-data": "/data"})
        wait_until(lambda: good in health(port).get("jobs", {}), "the labelled job in /healthz", 20, daemon.text)
        time.sleep(2)  # a second notification would be on its way by now
        assert len(label_errors()) == 1, webhook.posts
    finally:
        daemon.stop(signal.SIGTERM)
    assert daemon.proc.returncode == 0


def test_a_breakage_being_reported_at_sigterm_is_still_reported_before_the_daemon_exits(
        tmp_path: Path, made: Made, webhook: Webhook) -> None:
    """The failure ping of a broken label is slow to answer; SIGTERM comes while it is in flight.
    The daemon finishes the ping and sends the webhook after it before it exits: nothing else
    would tell anyone that the job is not backed up."""
    bad = f"bad-{made.run}"
    webhook.ping_delay = 4
    config = write(tmp_path, made.helper_image, schedule="0 3 * * *",
                   notifications={"webhook_url": webhook.url, "ping_url": webhook.ping_url, "timeout": "10s"})
    made.container(f"{bad}-app", {"backupd.enable": "true", "backupd.job": bad, "backupd.stop": "maybe"},
                   {f"{bad}-data": "/data"})
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        wait_until(lambda: [p for p, _ in list(webhook.posts) if p.startswith("/ping")], "the failure ping", 30,
                   daemon.text)
    finally:
        daemon.stop(signal.SIGTERM)
    assert daemon.proc.returncode == 0, daemon.text()[-2000:]
    paths = [p for p, _ in webhook.posts]
    assert paths == ["/ping/check-uuid/fail", "/hook/secret-token-123"], paths
    assert webhook.posts[1][1]["status"] == "label-error" and webhook.posts[1][1]["job"] == bad


def start_databases(made: Made, job: str, password_file: Path) -> tuple[Any, Any]:
    require_image(made.client, DB_IMAGE)
    pg = made.container(
        f"{job}-pg", {"backupd.enable": "true", "backupd.job": job, "backupd.database": "postgres",
                      "backupd.database.user": "postgres", "backupd.database.password_file": str(password_file)},
        {f"{job}-pgdata": PG_DATA}, image=DB_IMAGE, command=["sh", "-c", PG_SCRIPT],
        environment={"POSTGRES_PASSWORD": password_file.read_text().strip()})
    maria = made.container(
        f"{job}-maria", {"backupd.enable": "true", "backupd.job": job, "backupd.database": "mariadb",
                         "backupd.database.user": "root", "backupd.database.name": "shopdb"},
        {f"{job}-mariadata": "/var/lib/mysql"}, image=DB_IMAGE, command=["sh", "-c", MARIADB_SCRIPT])
    wait_until(lambda: pg.exec_run(["pg_isready", "-q", "-h", "127.0.0.1"]).exit_code == 0, "PostgreSQL", 90)
    wait_until(lambda: maria.exec_run(["mariadb-admin", "--silent", "ping"]).exit_code == 0, "MariaDB", 90)
    res = pg.exec_run(["su", "postgres", "-c", "psql -v ON_ERROR_STOP=1 -c 'CREATE DATABASE shop'"])
    assert res.exit_code == 0, res.output
    res = maria.exec_run(["mariadb", "-e", "CREATE DATABASE shop; CREATE TABLE shop.t (i int); "
                                           "INSERT INTO shop.t VALUES (7)"])
    assert res.exit_code == 0, res.output
    return pg, maria


def test_database_labels_dump_real_postgres_and_mariadb_and_list_jobs_says_where_each_setting_came_from(
        tmp_path: Path, made: Made) -> None:
    job = f"dbs-{made.run}"
    secret = tmp_path / "pg_password"
    secret.write_text(f"pw-{uuid.uuid4().hex}\n")
    secret.chmod(0o600)
    start_databases(made, job, secret)
    config = write(tmp_path, made.helper_image, schedule="0 3 * * *", retention={"keep_last": 2},
                   secrets_dir=str(tmp_path))

    proc = backupd(config, "list", "--jobs", "--json", check=True)
    assert secret.read_text().strip() not in proc.stdout
    row = {r["job"]: r for r in json.loads(proc.stdout)}[job]
    assert row["origin"] == "labels" and row["error"] is None, row
    s = row["settings"]
    assert sorted(row["containers"]) == [f"{job}-maria", f"{job}-pg"]
    assert s["schedule"] == {"value": "0 3 * * *", "from": "discovery default (discovery.schedule)"}
    assert s["retention"] == {"value": {"keep_last": 2}, "from": "discovery default (discovery.retention)"}
    assert s["volumes"] == []  # a database's dump is its backup
    assert {(d["value"]["type"], d["value"]["container"], d["from"]) for d in s["databases"]} == {
        ("postgres", f"{job}-pg", f"label backupd.database on container {job}-pg"),
        ("mariadb", f"{job}-maria", f"label backupd.database on container {job}-maria")}
    text = backupd(config, "list", "--jobs", "--job", job, check=True).stdout
    assert f"from labels: {job}-maria, {job}-pg" in text and "discovery default (discovery.schedule)" in text

    backup = backupd(config, "backup", job)
    assert backup.returncode == 0, backup.stderr
    (record,) = [b for b in listing(config) if b["job"] == job]
    names = sorted(a["name"] for a in record["artifacts"] if a["kind"] == "database")
    assert record["status"] == "succeeded" and any(n.startswith(f"{job}-pg") for n in names), names
    assert any(n.startswith("shopdb") for n in names), names
    catalog_and_logs = backup.stderr + json.dumps(listing(config)) + (tmp_path / "catalog.db").read_bytes().decode(
        "latin-1")
    assert secret.read_text().strip() not in catalog_and_logs


def test_a_password_in_a_label_is_refused_and_named_without_showing_it(tmp_path: Path, made: Made) -> None:
    job = f"pw-{made.run}"
    made.container(f"{job}-db", {"backupd.enable": "true", "backupd.job": job, "backupd.database": "postgres",
                                 "backupd.database.password": "hunter2-in-a-label"}, {f"{job}-data": "/data"})
    config = write(tmp_path, made.helper_image)
    row = jobs_listing(config)[job]
    assert "backupd.database.password" in row["error"] and "password_file" in row["error"]
    proc = backupd(config, "backup", job)
    assert proc.returncode == 2 and "backupd.database.password" in proc.stderr
    assert "hunter2-in-a-label" not in proc.stderr + json.dumps(row) + json.dumps(listing(config))
    unknown = backupd(config, "backup", f"nosuch-{made.run}")
    assert unknown.returncode == 2 and "nor declared by container labels" in unknown.stderr
    assert not [b for b in listing(config) if b["job"] == f"nosuch-{made.run}"]


COMPOSE = """
services:
  web:
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
    labels:
      backupd.enable: "true"
      backupd.volumes: "uploads"
      backupd.stop: "true"
      backupd.exclude: "tmp/*"
      {run_label}: "{run}"
    volumes:
      - uploads:/data
      - cache:/cache
  cache:
    image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
    labels:
      {run_label}: "{run}"
    volumes:
      - cache:/cache
volumes:
  uploads:
    labels:
      {run_label}: "{run}"
  cache:
    labels:
      {run_label}: "{run}"
"""


def test_real_compose_labels_make_one_job_per_project_and_stop_the_service_around_the_copy(
        tmp_path: Path, made: Made) -> None:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose missing: run `bash scripts/testenv.sh install`", pytrace=False)
    project = f"lbl{made.run}"
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(COMPOSE.format(image=made.helper_image, run_label=RUN_LABEL, run=made.run))

    def compose(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", "-p", project, "-f", str(compose_file), *args],
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    up = compose("up", "-d")
    try:
        assert up.returncode == 0, up.stderr
        web = made.client.containers.get(f"{project}_web_1")
        fill(web, "/data/upload", "an upload")
        assert web.exec_run(["mkdir", "/data/tmp"]).exit_code == 0
        fill(web, "/data/tmp/scratch", "left out by backupd.exclude")
        started = web.attrs["State"]["StartedAt"]
        config = write(tmp_path, made.helper_image, schedule="0 3 * * *", retention={"keep_last": 3})

        row = jobs_listing(config)[project]
        assert row["containers"] == [f"{project}_web_1"]
        s = row["settings"]
        assert s["volumes"] == [{"value": {"name": f"{project}_uploads", "exclude": ["tmp/*"]},
                                 "from": f"label backupd.volumes on container {project}_web_1"}]
        assert s["stop_containers"] == [{"value": {"name": f"{project}_web_1"},
                                         "from": f"label backupd.stop on container {project}_web_1"}]

        schedule = json.loads(backupd(config, "list", "--schedule", "--json", check=True).stdout)
        assert {"job": project, "action": "backup", "schedule": "0 3 * * *"}.items() <= \
            next(e for e in schedule if e["job"] == project).items()

        backup = backupd(config, "backup", project)
        assert backup.returncode == 0, backup.stderr
        (record,) = [b for b in listing(config) if b["job"] == project]
        assert [a["name"] for a in record["artifacts"]] == [f"{project}_uploads"]  # not the cache
        web.reload()
        assert web.status == "running" and web.attrs["State"]["StartedAt"] != started  # stopped, started again
        restored = backupd(config, "restore", record["id"], "--volume", f"{project}_uploads",
                           "--to-volume", f"{project}_restored")
        made.client.volumes.get(f"{project}_restored").reload()
        assert restored.returncode == 0, restored.stderr
        # Read on the host, as the kernel has it: a container's output read back through the engine
        # can come back empty when it exits at once (seen under load), which would also make an
        # empty listing pass for the wrong reason.
        restored_root = mountpoint(made.client, f"{project}_restored")
        assert (restored_root / "upload").read_bytes() == b"an upload"
        assert list((restored_root / "tmp").iterdir()) == []  # tmp/* was left out; the directory itself stays
        pruned = backupd(config, "prune", "--job", project, "--dry-run")  # discovery.retention applies
        assert pruned.returncode == 0 and f"job {project}" in pruned.stdout, pruned.stderr
    finally:
        compose("down", "-v", "--remove-orphans")
        try:
            made.client.volumes.get(f"{project}_restored").remove(force=True)
        except Exception:  # noqa: BLE001 - not made when the test failed before the restore
            pass


class SocketProxy:
    """A unix socket in front of the engine's, whose open connections a test can cut."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        import threading

        self.path, self.target = path, target
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.open: list[socket.socket] = []
        self.accepted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            with self._lock:
                self.open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Break every open connection, as an engine restart would."""
        with self._lock:
            cut, self.open = self.open, []
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_the_event_thread_sees_real_engine_events_and_reopens_a_stream_the_engine_side_broke(
        tmp_path: Path, made: Made) -> None:
    import docker

    from backupd.events import EventWatcher

    proxy = SocketProxy(tmp_path / "docker.sock")
    client = docker.DockerClient(base_url=f"unix://{tmp_path / 'docker.sock'}", timeout=60)
    watcher = EventWatcher(lambda: client, debounce=0.5, retry_first=0.2)
    watcher.start()
    try:
        wait_until(lambda: watcher.connections == 1, "the event stream", 10)
        made.container(f"ev-{made.run}-a", {"backupd.enable": "true"}, {f"ev-{made.run}-a": "/data"})
        wait_until(lambda: watcher.events >= 2, "create and start events of a labelled container", 10)
        wait_until(watcher.due, "the burst due once quiet", 5)
        helper = made.container(f"ev-{made.run}-b", {}, None)  # no backupd.enable: no event
        helper.remove(force=True)
        seen = watcher.events
        proxy.cut()
        wait_until(lambda: watcher.connections == 2, "the stream reopened", 10)
        wait_until(watcher.due, "a change noted after reconnecting (events may have been missed)", 5)
        assert watcher.events == seen
        made.container(f"ev-{made.run}-c", {"backupd.enable": "true"}, {f"ev-{made.run}-c": "/data"})
        wait_until(lambda: watcher.events > seen, "events on the reopened stream", 10)
    finally:
        stopped = time.monotonic()
        assert watcher.stop(timeout=5)
        assert time.monotonic() - stopped < 2
        client.close()
        proxy.close()
