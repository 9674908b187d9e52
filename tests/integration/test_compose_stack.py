"""The shipped docker-compose.yml, brought up by Compose (Debian's docker-compose) on a real
engine, the way the README tells users to run it: a scheduled backup of the app's volume, of
the database and of the service that opts in with labels alone, /healthz, restores through `docker-compose exec backupd backupd restore`, and
`down`.

No registry is reachable here, so the file's image names are overridden with local stand-ins:
PostgreSQL from the debootstrapped test image behind an entrypoint that reads
POSTGRES_PASSWORD_FILE like the official one, and a shell loop for the app.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.integration.services import DB_IMAGE, PG_SCRIPT, require_image
from tests.integration.test_sidecar import SOCKET
from tests.integration.test_volumes import REPO, mountpoint

pytestmark = pytest.mark.integration

POSTGRES_ENTRYPOINT = PG_SCRIPT.replace(
    "set -e\n", 'set -e\n[ -n "$POSTGRES_PASSWORD_FILE" ] && POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")\n', 1)
APP_SCRIPT = ("mkdir -p /usr/share/nginx/html && echo 'hello from the app' > /usr/share/nginx/html/index.html; "
              "trap 'exit 0' TERM; while :; do sleep 1; done")


def build(client, tag: str, dockerfile: str, files: dict[str, str]) -> str:
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in {"Dockerfile": dockerfile, **files}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    client.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True)
    return tag


@pytest.fixture(scope="module")
def stand_in_images(docker_client, helper_image) -> dict[str, str]:
    require_image(docker_client, DB_IMAGE)
    postgres = build(docker_client, "backupd-test-postgres:stand-in",
                     f"FROM {DB_IMAGE}\nCOPY entrypoint.sh /entrypoint.sh\nENTRYPOINT [\"sh\", \"/entrypoint.sh\"]\n",
                     {"entrypoint.sh": POSTGRES_ENTRYPOINT})
    app = build(docker_client, "backupd-test-app:stand-in",
                f"FROM {helper_image}\nCMD [\"sh\", \"-c\", {json.dumps(APP_SCRIPT)}]\n", {})
    return {"POSTGRES_IMAGE": postgres, "APP_IMAGE": app}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A copy of the shipped compose file and what it references, brought up under its own project."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.dir = tmp / "stack"
        self.dir.mkdir()
        shutil.copy(REPO / "docker-compose.yml", self.dir / "docker-compose.yml")
        shutil.copytree(REPO / "config", self.dir / "config")
        (self.dir / "secrets").mkdir()
        (self.dir / "secrets" / "db_password.txt").write_text("a-real-password")
        (self.dir / "secrets" / "webhook_url.txt").write_text("")
        for path in [self.dir, *self.dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # the sidecar reads them as uid 10001
        self.project = f"{PROJECT_PREFIX}{uuid.uuid4().hex[:6]}"
        self.env = {**os.environ, **env, "DOCKER_GID": str(Path(SOCKET).stat().st_gid)}

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker-compose", "-p", self.project, "-f", str(self.dir / "docker-compose.yml"),
                               *args], capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=self.dir, stdin=subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, f"docker-compose {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def backupd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", "backupd", "backupd", *args, check=check)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail=60", check=False).stdout


def wait_until(check: Any, what: str, timeout: float, logs: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, AssertionError, json.JSONDecodeError):
            result = None
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"{what} not seen within {timeout:.0f}s\n{logs()}", pytrace=False)


PROJECT_PREFIX = "backupdtest"


def remove_leftovers_of_earlier_runs(client) -> None:
    """The shipped file names its database container and volumes (shop-db, shop_*): what an
    interrupted earlier run of this test left would block `up` or hand it old data. Only what
    carries one of this test's project names is removed."""
    for container in client.containers.list(all=True, filters={"label": "com.docker.compose.project"}):
        if container.labels.get("com.docker.compose.project", "").startswith(PROJECT_PREFIX):
            container.remove(force=True, v=True)
    for volume in client.volumes.list(filters={"label": "com.docker.compose.project"}):
        if (volume.attrs.get("Labels") or {}).get("com.docker.compose.project", "").startswith(PROJECT_PREFIX):
            volume.remove(force=True)


@pytest.fixture
def stack(docker_client, sidecar_image, stand_in_images, tmp_path) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose missing: run `bash scripts/testenv.sh install`", pytrace=False)
    remove_leftovers_of_earlier_runs(docker_client)
    port = free_port()
    config = yaml.safe_load((REPO / "config" / "compose.yml").read_text())
    for job in [*config["jobs"].values(), config["discovery"]]:
        job["schedule"] = "* * * * *"  # the shipped nightly schedule, every minute for the test
    config_file = tmp_path / "compose-test.yml"
    config_file.write_text(json.dumps(config))
    config_file.chmod(0o644)
    tmp_path.chmod(0o755)
    s = Stack(tmp_path, {**stand_in_images, "BACKUPD_IMAGE": sidecar_image, "BACKUPD_PORT": str(port),
                         "BACKUPD_CONFIG_FILE": str(config_file)})
    s.port = port  # type: ignore[attr-defined]
    yield s
    s.compose("down", "-v", "--remove-orphans", check=False)


def test_the_shipped_compose_file_backs_up_restores_and_comes_down(docker_client, stack):
    stack.compose("up", "-d", "--no-build")
    health = f"http://127.0.0.1:{stack.port}/healthz"
    wait_until(lambda: urllib.request.urlopen(health, timeout=5).status == 200, "/healthz 200", 90, stack.logs)
    db = docker_client.containers.get("shop-db")
    wait_until(lambda: db.exec_run(["pg_isready", "-q"]).exit_code == 0, "PostgreSQL", 90, stack.logs)
    res = db.exec_run(["psql", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c",
                       "CREATE DATABASE shop; "])
    assert res.exit_code == 0, res.output
    res = db.exec_run(["psql", "-U", "postgres", "-d", "shop", "-v", "ON_ERROR_STOP=1", "-c",
                       "CREATE TABLE orders (id int PRIMARY KEY, item text); "
                       "INSERT INTO orders VALUES (1, 'teapot'), (2, 'kettle');"])
    assert res.exit_code == 0, res.output

    def succeeded() -> dict[str, dict]:
        backups = json.loads(stack.backupd("list", "--json").stdout)
        done = {b["job"]: b for b in backups if b["status"] == "succeeded"
                and (b["job"] != "db" or "shop.shop" in {a["name"] for a in b["artifacts"]})}
        return done if {"app", "db", stack.project} <= set(done) else {}

    done = wait_until(succeeded, "scheduled backups of the volume, the database and the labelled service",
                      150, stack.logs)
    # the `notes` service, protected by its labels alone: its job is the Compose project's
    assert [a["name"] for a in done[stack.project]["artifacts"]] == ["shop_notesdata"]
    jobs = {row["job"]: row for row in json.loads(stack.backupd("list", "--jobs", "--json").stdout)}
    notes = f"{stack.project}_notes_1"
    assert jobs[stack.project]["origin"] == "labels" and jobs[stack.project]["containers"] == [notes]
    assert jobs[stack.project]["settings"]["stop_containers"] == [
        {"value": {"name": notes}, "from": f"label backupd.stop on container {notes}"}]
    assert jobs["app"]["origin"] == "config"
    assert docker_client.containers.get(notes).status == "running"  # stopped for the copy, started again
    assert urllib.request.urlopen(health, timeout=5).status == 200

    # the database: drop a row, restore the dump over it through the running sidecar
    db.exec_run(["psql", "-U", "postgres", "-d", "shop", "-c", "DELETE FROM orders WHERE id = 2"])
    stack.backupd("restore", done["db"]["id"], "--database", "shop.shop", "--force")
    rows = db.exec_run(["psql", "-U", "postgres", "-d", "shop", "-Atc", "SELECT item FROM orders ORDER BY id"])
    assert rows.output.decode().split() == ["teapot", "kettle"]

    # the volume: into a new volume, compared with the original
    target = f"shop_restored_{uuid.uuid4().hex[:6]}"
    try:
        stack.backupd("restore", done["app"]["id"], "--volume", "shop_appdata", "--to-volume", target)
        restored = mountpoint(docker_client, target) / "index.html"
        assert restored.read_text() == "hello from the app\n"
    finally:
        for container in docker_client.containers.list(all=True, filters={"volume": target}):
            container.remove(force=True)
        docker_client.volumes.get(target).remove(force=True)

    helpers = [c for volume in ("shop_appdata", "shop_notesdata", "shop_backupd_state")
               for c in docker_client.containers.list(all=True, filters={"volume": volume,
                                                                         "label": "backupd.helper"})]
    assert helpers == [], "no helper container is left holding the stack's volumes"
    down = stack.compose("down", "-v")
    assert down.returncode == 0
    left = docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={stack.project}"})
    assert left == []
