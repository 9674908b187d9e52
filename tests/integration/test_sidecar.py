"""The sidecar image on a real engine: builds from the local base, runs a `* * * * *`
backup within a minute, answers /healthz and /metrics, and on SIGTERM mid-run leaves
nothing half-written, records the run failed, notifies the webhook and exits 0.

The container uses host networking so that it reaches the test's loopback webhook
and the test reaches its loopback HTTP port; the helper image is then the sidecar's
own image by name (under host networking its hostname is the host's).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import docker
import pytest
from docker.errors import NotFound

from tests.integration.services import run_to_end, volume_files

SOCKET = "/var/run/docker.sock"


class Webhook:
    """A loopback receiver that records every POST body: a webhook's JSON, or a ping's text
    (under /ping, answered only after `ping_delay` seconds, as a slow monitor would)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.ping_delay = 0.0
        received, hook = self.posts, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/ping"):
                    received.append((self.path, {"text": body.decode(errors="replace")}))
                    time.sleep(hook.ping_delay)
                else:
                    received.append((self.path, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/secret-token-123"
        self.ping_url = f"http://127.0.0.1:{self.server.server_address[1]}/ping/check-uuid"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill(client: docker.DockerClient, image: str, volume: str, megabytes: int) -> None:
    """Random a/b bytes: gzip -9 crawls through them (well under 1 MB/s), so a run of a few
    MB lasts long enough to be interrupted, and its compressor checks for cancel per chunk."""
    rng = random.Random(megabytes)
    blob = bytes(rng.choice(b"ab") for _ in range(megabytes << 20))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("blob")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    holder = client.containers.create(image, ["true"], volumes={volume: {"bind": "/data", "mode": "rw"}})
    try:
        holder.put_archive("/data", archive.getvalue())
    finally:
        holder.remove(force=True, v=True)


class Sidecar:
    """A running sidecar container and the ways a test looks at it."""

    def __init__(self, client: docker.DockerClient, image: str, tmp: Path, data_volume: str,
                 state_volume: str, backups_volume: str, webhook_url: str, compression: dict,
                 retention: dict | None = None) -> None:
        self.client, self.image = client, image
        self.port = _free_port()
        config = {
            "catalog": "sqlite:////var/lib/backupd/catalog.db",
            "helper_image": image,
            "destinations": {"local": {"type": "local", "path": "/backups"}},
            "jobs": {"data": {"schedule": "* * * * *", "volumes": [data_volume],
                              "compression": compression, **({"retention": retention} if retention else {})}},
            "scheduler": {"stop_grace": "1s", "misfire_grace": "30s"},
            "notifications": {"webhook_url": webhook_url, "timeout": "5s"},
        }
        tmp.chmod(0o755)
        cfg = tmp / "backupd.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        cfg.chmod(0o644)
        self.volumes = {SOCKET: {"bind": SOCKET, "mode": "rw"},
                        str(cfg): {"bind": "/etc/backupd/backupd.yml", "mode": "ro"},
                        state_volume: {"bind": "/var/lib/backupd", "mode": "rw"},
                        backups_volume: {"bind": "/backups", "mode": "rw"}}
        self.container = client.containers.run(
            image, detach=True, name=f"backupd-sidecar-{uuid.uuid4().hex[:8]}", network_mode="host",
            group_add=[str(Path(SOCKET).stat().st_gid)], read_only=True, tmpfs={"/tmp": ""},
            environment={"BACKUPD_HTTP": f"127.0.0.1:{self.port}"}, volumes=self.volumes)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, b""  # not listening yet

    def backups(self) -> list[dict[str, Any]]:
        """`backupd list --json` inside the running container (or a fresh one once it stopped)."""
        self.container.reload()
        if self.container.status == "running":
            code, out = self.container.exec_run(["backupd", "list", "--json"], demux=True)
            if code != 0:  # e.g. the sidecar is still creating the catalog: ask again next poll
                return []
            return json.loads(out[0])
        status, out, err = run_to_end(self.client, self.image, ["list", "--json"], volumes=self.volumes,
                                      network_mode="none")
        assert status == 0, err.decode(errors="replace")[-2000:]
        return json.loads(out)

    def wait_for(self, check: Any, what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            self.container.reload()
            assert self.container.status == "running", self.logs()
            time.sleep(1)
        pytest.fail(f"{what} not seen within {timeout:.0f}s; logs:\n{self.logs()}", pytrace=False)

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")[-6000:]

    def remove(self) -> None:
        try:
            self.container.remove(force=True, v=True)  # with the image's anonymous volumes
        except NotFound:
            pass


@pytest.fixture
def start_sidecar(docker_client, sidecar_image, helper_image, volume_factory, webhook, tmp_path):
    made: list[Sidecar] = []

    def start(megabytes: int, compression: dict, retention: dict | None = None) -> tuple[Sidecar, str, str]:
        data, state, backups = volume_factory("scdata"), volume_factory("scstate"), volume_factory("scbak")
        _fill(docker_client, helper_image, data, megabytes)
        sidecar = Sidecar(docker_client, sidecar_image, tmp_path, data, state, backups, webhook.url, compression,
                          retention)
        made.append(sidecar)
        return sidecar, data, backups

    yield start
    for sidecar in made:
        sidecar.remove()


def test_image_backs_up_on_a_minute_schedule_applies_retention_and_reports_health_and_metrics(
        start_sidecar, webhook, docker_client):
    """The sidecar as deployed: two scheduled runs of a keep_last: 1 job leave exactly one
    backup, in the catalog and on disk (the first was pruned when the second succeeded)."""
    sidecar, _, backups_volume = start_sidecar(megabytes=1, compression={"algorithm": "zstd"},
                                               retention={"keep_last": 1})
    sidecar.wait_for(lambda: sidecar.get("/healthz")[0] == 200, "healthy /healthz", 30)

    code, out = sidecar.container.exec_run(["backupd", "list", "--schedule", "--json"])
    assert code == 0 and json.loads(out)[0]["schedule"] == "* * * * *"

    def runs_succeeded() -> float:
        for line in sidecar.get("/metrics")[1].decode().splitlines():
            if line.startswith('backupd_runs_total{job="data",status="succeeded"}'):
                return float(line.split()[-1])
        return 0.0

    sidecar.wait_for(lambda: runs_succeeded() >= 2, "two succeeded scheduled backups", 150)
    sidecar.wait_for(lambda: len(sidecar.backups()) == 1, "retention applied after the second run", 30)
    [backup] = sidecar.backups()
    assert backup["status"] == "succeeded"
    assert [a["name"] for a in backup["artifacts"]][0].startswith("scdata-")
    on_disk = [f for f in volume_files(docker_client, backups_volume) if ".tar." in f]
    assert len(on_disk) == 1 and backup["id"] in on_disk[0], on_disk

    status, body = sidecar.get("/healthz")
    health = json.loads(body)
    assert status == 200, health
    assert health["scheduler"]["alive"] and health["catalog"]["reachable"]
    job = health["jobs"]["data"]
    assert job["overdue"] is False and job["last_run"]["status"] == "succeeded"

    status, body = sidecar.get("/metrics")
    metrics = body.decode()
    assert status == 200
    assert 'backupd_artifacts{destination="local"} 1.0' in metrics
    assert 'backupd_last_success_timestamp_seconds{job="data"}' in metrics
    assert 'backupd_run_duration_seconds_count{job="data"}' in metrics
    written = [line for line in metrics.splitlines() if line.startswith('backupd_bytes_written_total{')]
    assert written and float(written[0].split()[-1]) >= 2 * backup["size"]

    lines = [json.loads(line) for line in sidecar.logs().splitlines() if line.startswith("{")]
    assert any(rec.get("job") == "data" and rec.get("run_id") and rec.get("backup_id") == backup["id"]
               for rec in lines), "scheduler lines carry job, run id and backup id"
    assert any("pruned job data" in rec.get("message", "") for rec in lines)
    assert not any(rec.get("level") == "error" for rec in lines), [r for r in lines if r.get("level") == "error"]
    assert webhook.posts == [], "success is not notified unless asked"


def test_sigterm_during_a_scheduled_run_cancels_it_cleanly_and_notifies_the_failure(
        start_sidecar, webhook, docker_client):
    # About 10 s of gzip -9 (see _fill); SIGTERM comes a second or two in, stop_grace is 1 s.
    sidecar, data, backups_volume = start_sidecar(megabytes=4, compression={"algorithm": "gzip", "level": 9})
    running = sidecar.wait_for(lambda: [b for b in sidecar.backups() if b["status"] == "running"],
                               "a running scheduled backup", 100)
    backup_id = running[0]["id"]
    time.sleep(1)
    sidecar.container.kill(signal="SIGTERM")
    exit_status = sidecar.container.wait(timeout=60)
    assert exit_status["StatusCode"] == 0, sidecar.logs()

    recorded = {b["id"]: b for b in sidecar.backups()}[backup_id]
    assert recorded["status"] == "failed", recorded
    assert "cancel" in (recorded["error"] or ""), recorded

    leftovers = "\n".join(volume_files(docker_client, backups_volume))
    assert ".partial" not in leftovers, leftovers
    assert backup_id not in leftovers, "nothing of the cancelled run stays under a final name"
    helpers = docker_client.containers.list(all=True, filters={"volume": data, "label": "backupd.helper"})
    assert helpers == [], "no helper container left holding the volume"

    failures = [body for _, body in webhook.posts if body["backup_id"] == backup_id]
    assert len(failures) == 1 and failures[0]["status"] == "failed", webhook.posts
    assert failures[0]["job"] == "data" and failures[0]["errors"]
    assert webhook.posts[0][0] == "/hook/secret-token-123"
    assert "secret-token-123" not in sidecar.logs(), "webhook token never logged"
