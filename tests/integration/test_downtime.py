"""Containers in stop_containers are down only for the volume copy, in both formats, and each
run's downtime is recorded (list --json, show) and exported (/metrics of `backupd run`)."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from datetime import datetime

import pytest

from tests.integration.test_daemon import daemons, wait_until  # noqa: F401 - fixture
from tests.integration.test_quiesce import pg_data  # noqa: F401 - fixture
from tests.integration.test_repository import repo_config, restic_image  # noqa: F401 - fixture
from tests.integration.test_volumes import backupd, listing, mountpoint, write_config

pytestmark = pytest.mark.integration

# Stops at once on SIGTERM (`wait` is interrupted by the trap), so the downtime is backupd's.
QUICK_APP = ["sh", "-c", "trap 'exit 0' TERM; sleep 1000000 & wait"]


@pytest.fixture
def app(docker_client, helper_image, volume_factory):
    vol = volume_factory("downtime")
    root = mountpoint(docker_client, vol)
    (root / "big.bin").write_bytes(__import__("os").urandom(64 << 20))
    container = docker_client.containers.run(helper_image, QUICK_APP, detach=True,
                                             name=f"app-{uuid.uuid4().hex[:8]}",
                                             volumes={vol: {"bind": "/data", "mode": "rw"}})
    yield container, vol
    container.remove(force=True)


def docker_time(value: str) -> float:
    """An engine timestamp (nanoseconds, Z) as seconds since the epoch."""
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def log_times(stderr: str, *needles: str) -> list[float]:
    """When each needle was first logged (JSON log lines)."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    found = []
    for needle in needles:
        entry = next(e for e in lines if needle in e["message"])
        found.append(datetime.fromisoformat(entry["time"]).timestamp())
    return found


@pytest.mark.parametrize("fmt", ["archive", "repository"])
def test_containers_are_down_only_for_the_volume_copy_and_the_downtime_is_recorded_and_shown(
        docker_client, helper_image, restic_image, pg_data, app, tmp_path, fmt):
    container, vol = app
    job = {"volumes": [vol], "stop_containers": [container.name],
           "databases": [{"name": "pg", "type": "postgres", "container": pg_data.name, "database": "app"}]}
    if fmt == "repository":
        config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": job})
    else:
        config = write_config(tmp_path, helper_image, {"j": job})
    proc = backupd_json(config)
    assert proc.returncode == 0, proc.stderr[-1500:]
    [backup] = listing(config)
    assert backup["status"] == "succeeded"
    recorded = backup["downtime_seconds"]
    container.reload()
    state = container.attrs["State"]
    assert state["Running"]
    # What the engine saw (the container exited, then started again) lies within what was recorded.
    seen = docker_time(state["StartedAt"]) - docker_time(state["FinishedAt"])
    assert 0 < seen <= recorded + 0.05, (seen, recorded)
    # The dump was whole before anything stopped; the manifest and after-hooks come after the start.
    dumped, stopping, starting, finished = log_times(
        proc.stderr, "database pg: snapshot" if fmt == "repository" else "database pg succeeded", "stopping container",
        "starting container", f"backup {backup['id']} of job j succeeded")
    assert dumped < stopping < starting < finished
    assert docker_time(state["FinishedAt"]) >= stopping - 0.05
    shown = backupd(config, "show", backup["id"])
    assert f"downtime  {recorded:.1f} s" in shown.stdout


def backupd_json(config):
    import os
    import subprocess
    import sys

    from tests.integration.test_volumes import REPO

    return subprocess.run([sys.executable, "-m", "backupd", "--log-format", "json", "--config", str(config),
                           "backup", "j"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_daemon_exports_each_runs_downtime_per_job(
        docker_client, helper_image, restic_image, app, tmp_path, daemons):
    container, vol = app
    port = free_port()
    config, _ = repo_config(tmp_path, helper_image, restic_image, {
        "web": {"schedule": "* * * * *", "volumes": [vol], "stop_containers": [container.name]}})
    data = json.loads(config.read_text())
    data["http"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    config.write_text(json.dumps(data))
    daemon = daemons(config)

    def scraped() -> str | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return None
        return text if 'backupd_container_downtime_seconds_count{job="web"} 1.0' in text else None

    text = wait_until(scraped, "a run's downtime in /metrics", 150, daemon.text)
    [backup] = listing(config)
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('backupd_container_downtime_seconds_sum{job="web"}'))
    assert total == pytest.approx(backup["downtime_seconds"])
    container.reload()
    assert container.status == "running"
