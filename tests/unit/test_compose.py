"""The shipped docker-compose.yml: the sidecar is wired the way the README (Running as a sidecar) says,
its config validates, and (where docker-compose is installed) Compose accepts the file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from backupd.config import load_config
from backupd.scheduler import entries_of

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def mount_target(spec: str) -> str:
    """SOURCE:TARGET[:MODE], where SOURCE may be ${VAR:-default} with a colon of its own."""
    return spec.rsplit("}", 1)[-1].lstrip(":").split(":")[0] if spec.startswith("${") else spec.split(":")[1]


def test_the_sidecar_mounts_the_socket_config_catalog_and_backups(stack: dict) -> None:
    svc = stack["services"]["backupd"]
    mounts = {mount_target(m): m for m in svc["volumes"]}
    assert mounts["/var/run/docker.sock"].startswith("/var/run/docker.sock:")
    assert mounts["/etc/backupd/backupd.yml"] == \
        "${BACKUPD_CONFIG_FILE:-./config/compose.yml}:/etc/backupd/backupd.yml:ro"
    assert mounts["/var/lib/backupd"].split(":")[0] in stack["volumes"]
    assert mounts["/backups"].split(":")[0] in stack["volumes"]


def test_the_sidecar_runs_read_only_non_root_with_the_socket_group_and_a_stop_grace(stack: dict) -> None:
    svc = stack["services"]["backupd"]
    assert svc["read_only"] is True and "/tmp" in svc["tmpfs"]
    assert "DOCKER_GID" in svc["group_add"][0]
    assert "user" not in svc, "the image's non-root user is kept"
    assert svc["stop_grace_period"] == "6m"


def test_secrets_come_from_files_and_reach_their_users(stack: dict) -> None:
    assert all("file" in spec for spec in stack["secrets"].values())
    assert "db_password" in stack["services"]["db"]["secrets"]
    assert stack["services"]["db"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password"
    for name, spec in stack["secrets"].items():
        assert (REPO / spec["file"]).exists(), f"secret file for {name} is shipped"


def test_the_mounted_config_names_the_stacks_volume_and_database_and_stops_within_compose_grace(
        stack: dict) -> None:
    config = load_config(REPO / "config" / "compose.yml")
    assert config.jobs["app"].volumes[0].name == stack["volumes"]["appdata"]["name"]
    assert config.jobs["db"].databases[0].container == stack["services"]["db"]["container_name"]
    assert {e.id for e in entries_of(config)} == {"backup:app", "backup:db"}
    from backupd.daemon import notify_wait
    from backupd.scheduler import CANCEL_WAIT

    # SIGTERM: stop_grace for running runs, then CANCEL_WAIT to unwind, then label notifications
    # still in flight, all before Docker's SIGKILL
    assert stack["services"]["backupd"]["stop_grace_period"] == "6m"
    assert config.scheduler.stop_grace.total_seconds() + CANCEL_WAIT + notify_wait(config) < 6 * 60
    assert config.notifications.webhook_url_file == Path("/run/secrets/webhook_url")


def test_images_config_and_port_can_be_overridden_for_hosts_without_a_registry(stack: dict) -> None:
    services = stack["services"]
    assert services["db"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    assert services["app"]["image"] == "${APP_IMAGE:-nginx:stable}"
    assert services["backupd"]["image"] == "${BACKUPD_IMAGE:-backupd:latest}"
    assert services["backupd"]["ports"] == ["127.0.0.1:${BACKUPD_PORT:-8080}:8080"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_compose_accepts_the_file() -> None:
    result = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, env={**os.environ, "DOCKER_GID": "999"})
    assert result.returncode == 0, result.stderr
