"""The daemon as users run it (`backupd run` on the host, and the image as a sidecar container)
keeps the promises the CLI keeps, on a real engine:

- a container a killed daemon held stopped is started by the next daemon at its start (within
  30 s on a loaded CI machine: the start itself is most of it), also
  when the next daemon is a new container with a new hostname (Compose recreated it);
- a CLI backup of a job the daemon is running waits for it and never overlaps it.

Retention applied by the running daemon is proven by tests/integration/test_sidecar.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.integration.services import APP_COMMAND
from tests.integration.test_repository import repo_config, restic_image  # noqa: F401 - a fixture
from tests.integration.test_sidecar import SOCKET, _fill
from tests.integration.test_volumes import REPO, backupd, listing, mountpoint, write_config

pytestmark = pytest.mark.integration

SLOW = {"algorithm": "gzip", "level": 9}  # with _fill's a/b bytes: about 2.5 s per MB here


def wait_until(check: Callable[[], Any], what: str, timeout: float, logs: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {timeout:.0f}s\n{logs()[-4000:]}", pytrace=False)


class Daemon:
    """`backupd run` as a process on the host, its log in a file."""

    def __init__(self, config: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        """`args` go after `run` (`--http 127.0.0.1:PORT`); `env` adds to the environment."""
        self.log = log
        self.out = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "backupd", "--log-format", "json", "--config",
                                      str(config), "run", *args],
                                     env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                     stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.out.close()


@pytest.fixture
def daemons(tmp_path: Path):
    made: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        made.append(Daemon(config, tmp_path / f"daemon-{len(made)}.log", env=env))
        return made[-1]

    yield start
    for d in made:
        d.stop(signal.SIGKILL)


@pytest.fixture
def held_app(docker_client, helper_image, volume_factory):
    """A running app container and a volume slow enough to back up that a test can act mid-copy."""
    vol = volume_factory("held")
    _fill(docker_client, helper_image, vol, 6)
    app = docker_client.containers.run(helper_image, APP_COMMAND, detach=True, name=f"app-{uuid.uuid4().hex[:8]}",
                                       volumes={vol: {"bind": "/data", "mode": "rw"}})
    yield app, vol
    app.remove(force=True)


def slow_job(volume: str, app) -> dict:
    """Every minute, the app stopped while its volume is copied slowly."""
    return {"schedule": "* * * * *", "volumes": [volume], "stop_containers": [app.name], "compression": SLOW}


def status_of(container) -> str:
    container.reload()
    return container.status


def no_helpers_on(docker_client, volume: str) -> bool:
    return not docker_client.containers.list(all=True, filters={"volume": volume, "label": "backupd.helper"})


def test_a_container_held_stopped_by_a_killed_daemon_is_started_by_the_next_daemon(
        docker_client, helper_image, held_app, daemons, tmp_path):
    app, vol = held_app
    config = write_config(tmp_path, helper_image, {"slow": slow_job(vol, app)}, scheduler={"misfire_grace": "30s"})
    first = daemons(config)
    wait_until(lambda: status_of(app) == "exited", "the scheduled run stopping the app", 90, first.text)
    time.sleep(1)
    first.stop(signal.SIGKILL)
    assert status_of(app) == "exited", "SIGKILL restarts nothing: the next daemon must"

    killed_at = time.monotonic()
    second = daemons(config)
    wait_until(lambda: status_of(app) == "running", "the app started again", 30, second.text)
    assert time.monotonic() - killed_at < 30
    wait_until(lambda: no_helpers_on(docker_client, vol), "the dead daemon's helper removed", 10, second.text)
    recovered = wait_until(lambda: [json.loads(line) for line in second.text().splitlines()
                                    if "start-up recovery" in line], "the recovery log line", 10, second.text)
    assert f"started container(s) left stopped: {app.name}" in recovered[0]["message"]
    [interrupted] = [b for b in listing(config) if b["status"] != "running"]
    assert interrupted["status"] == "failed" and "interrupted" in interrupted["error"]


def test_a_cli_backup_of_a_job_the_daemon_is_running_waits_and_never_overlaps(
        docker_client, helper_image, held_app, daemons, tmp_path):
    app, vol = held_app
    config = write_config(tmp_path, helper_image, {"slow": slow_job(vol, app)},
                          scheduler={"misfire_grace": "30s", "stop_grace": "1s"})
    daemon = daemons(config)
    wait_until(lambda: [b for b in listing(config) if b["status"] == "running"], "the daemon's run", 90, daemon.text)
    cli = backupd(config, "backup", "slow")
    assert cli.returncode == 0, cli.stderr
    assert "waiting: job:slow is held by backupd run" in cli.stderr
    refused = backupd(config, "backup", "slow", "--no-wait")  # the daemon may have started its next run
    assert refused.returncode in (0, 75)
    runs = sorted((b for b in listing(config) if b["status"] != "running"), key=lambda b: b["started_at"])
    assert len(runs) >= 2 and all(b["status"] == "succeeded" for b in runs), runs
    for earlier, later in zip(runs, runs[1:]):
        assert earlier["finished_at"] <= later["started_at"], "two runs of one job overlapped"
    daemon.stop()  # its next scheduled run may hold the app stopped: stopping must start it again
    assert daemon.proc.returncode == 0, daemon.text()[-3000:]
    assert status_of(app) == "running"


@pytest.fixture
def sidecar_container(docker_client, sidecar_image, tmp_path):
    """Start the image as a sidecar on the default bridge (its own hostname), state in a volume."""
    made: list[Any] = []

    def start(config: dict, state_volume: str) -> Any:
        cfg = tmp_path / "sidecar.yml"
        cfg.write_text(json.dumps(config))
        cfg.chmod(0o644)
        tmp_path.chmod(0o755)
        made.append(docker_client.containers.run(
            sidecar_image, detach=True, name=f"backupd-sidecar-{uuid.uuid4().hex[:8]}",
            group_add=[str(Path(SOCKET).stat().st_gid)], read_only=True, tmpfs={"/tmp": ""},
            environment={"BACKUPD_HTTP": "127.0.0.1:8080"}, command=["--log-format", "json", "run"],
            volumes={SOCKET: {"bind": SOCKET, "mode": "rw"},
                     str(cfg): {"bind": "/etc/backupd/backupd.yml", "mode": "ro"},
                     state_volume: {"bind": "/var/lib/backupd", "mode": "rw"}}))
        return made[-1]

    yield start
    for container in made:
        container.remove(force=True, v=True)


def test_the_same_holds_when_the_next_daemon_is_a_new_container_with_a_new_hostname(
        docker_client, sidecar_image, held_app, volume_factory, sidecar_container):
    app, vol = held_app
    state = volume_factory("scstate")
    config = {"catalog": "sqlite:////var/lib/backupd/catalog.db", "helper_image": sidecar_image,
              "destinations": {"local": {"type": "local", "path": "/var/lib/backupd/backups"}},
              "scheduler": {"misfire_grace": "30s"},
              "jobs": {"slow": slow_job(vol, app)}}
    first = sidecar_container(config, state)
    logs = lambda c=first: c.logs().decode(errors="replace")  # noqa: E731
    wait_until(lambda: status_of(app) == "exited", "the scheduled run stopping the app", 90, logs)
    pipes = mountpoint(docker_client, state) / ".fifo"
    killed_pipes = wait_until(lambda: list(pipes.glob("*.tar")), "the run copying through its pipe", 30, logs)
    first.kill(signal="SIGKILL")
    first.wait(timeout=30)
    assert status_of(app) == "exited"

    second = sidecar_container(config, state)
    second.reload()
    first.reload()
    assert second.attrs["Config"]["Hostname"] != first.attrs["Config"]["Hostname"]
    wait_until(lambda: status_of(app) == "running", "the app started by the new container", 30,
               lambda: second.logs().decode(errors="replace"))
    wait_until(lambda: "start-up recovery: " in second.logs().decode(errors="replace"), "the recovery log line",
               10, lambda: second.logs().decode(errors="replace"))
    assert not any(p.exists() for p in killed_pipes), "the killed daemon's pipe is removed by the next one"


def test_a_container_held_by_a_killed_cli_backup_is_started_by_the_running_daemon(
        docker_client, helper_image, held_app, daemons, tmp_path):
    app, vol = held_app
    job = {**slow_job(vol, app), "schedule": "0 0 1 1 *"}  # the daemon itself never runs it here
    config = write_config(tmp_path, helper_image, {"slow": job})
    temp = tmp_path / "tmp"  # the temp directory of both, where a CLI on the host makes its pipe
    temp.mkdir()
    daemon = daemons(config, {"TMPDIR": str(temp)})
    wait_until(lambda: "start-up recovery: " in daemon.text(), "the daemon's start", 30, daemon.text)
    cli = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "slow"],
                           env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: status_of(app) == "exited" and list(temp.glob("backupd-fifo-*/*.tar")),
               "the CLI backup stopping the app and copying through its pipe", 60)
    cli.send_signal(signal.SIGKILL)
    cli.wait(10)
    assert status_of(app) == "exited"
    wait_until(lambda: status_of(app) == "running", "the daemon's periodic recovery starting the app", 75,
               daemon.text)
    assert "recovery: " in daemon.text() and app.name in daemon.text()
    wait_until(lambda: not list(temp.iterdir()), "the killed CLI's pipe directory removed", 10,
               lambda: f"{list(temp.iterdir())}\n{daemon.text()}")


def test_recovery_leaves_alone_the_helpers_of_a_backupd_with_another_catalog(
        docker_client, helper_image, volume_factory, tmp_path):
    """Two installations on one engine (two stacks, or a CLI with its own config): neither may
    remove the other's running helpers as stale."""
    foreign = docker_client.containers.run(helper_image, APP_COMMAND, detach=True,
                                           labels={"backupd.helper": "backup", "backupd.owner": uuid.uuid4().hex})
    try:
        vol = volume_factory("quick")
        config = write_config(tmp_path, helper_image, {"quick": {"volumes": [vol]}})
        backupd(config, "backup", "quick", check=True)
        assert status_of(foreign) == "running"
    finally:
        foreign.remove(force=True)


def test_a_cancelled_snapshot_stuck_in_its_helper_is_ended_and_the_stopped_app_started(
        docker_client, helper_image, restic_image, held_app, daemons, tmp_path):
    """SIGTERM while a scheduled restic snapshot hangs (its helper frozen here, as on an upload
    that stalls): once stop_grace has passed the daemon ends its own helpers, the run unwinds and
    the app it stopped runs again. Before, the run never saw the cancel: the daemon gave up after
    30 s and exited with the app stopped."""
    app, vol = held_app
    with open(mountpoint(docker_client, vol) / "big.bin", "wb") as f:
        for _ in range(300):  # seconds of restic work: time to catch its helper
            f.write(os.urandom(1 << 20))
    config, _ = repo_config(tmp_path, helper_image, restic_image,
                            {"slow": {"schedule": "* * * * *", "volumes": [vol], "stop_containers": [app.name]}})
    settings = json.loads(config.read_text())
    settings["scheduler"] = {"misfire_grace": "30s", "stop_grace": "1s"}
    config.write_text(json.dumps(settings))
    daemon = daemons(config)

    def snapshot_helper() -> Any:
        helpers = docker_client.containers.list(filters={"label": "backupd.helper", "volume": vol})
        return next((c for c in helpers if c.labels["backupd.helper"].startswith("backup of")), None)

    helper = wait_until(lambda: status_of(app) == "exited" and snapshot_helper(), "the scheduled snapshot",
                        90, daemon.text)
    helper.pause()
    started = time.monotonic()
    daemon.stop()
    assert daemon.proc.returncode == 0, daemon.text()[-3000:]
    assert time.monotonic() - started < 20, "the stop waited the cancelled run out"
    assert status_of(app) == "running", daemon.text()[-3000:]
    assert no_helpers_on(docker_client, vol)
    [run] = listing(config)
    assert run["status"] == "failed" and "cancelled" in run["error"], run


def test_a_run_deaf_to_its_cancel_does_not_keep_the_daemon_from_exiting(
        docker_client, helper_image, held_app, daemons, tmp_path):
    """A run stuck where no cancel reaches it (a before hook hanging in its container): the stop
    gives it stop_grace and 30 s, then `backupd run` exits 1 without it. Before, the run's
    scheduler thread kept the process alive until Docker's SIGKILL."""
    app, vol = held_app
    job = {"schedule": "* * * * *", "volumes": [vol],
           "hooks": {"before": [{"container": app.name, "command": ["sleep", "300"], "timeout": "10m"}]}}
    config = write_config(tmp_path, helper_image, {"hung": job},
                          scheduler={"misfire_grace": "30s", "stop_grace": "1s"})
    # Its temp directory is the test's: exiting without unwinding leaves its pipe directory for
    # the next start to remove, and no next start comes here.
    daemon = daemons(config, {"TMPDIR": str(tmp_path)})
    wait_until(lambda: "step 1/6: before hooks" in daemon.text(), "the scheduled run's before hook", 90, daemon.text)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(90)
    took = time.monotonic() - started
    assert daemon.proc.returncode == 1, daemon.text()[-3000:]
    assert took < 45, f"exited {took:.0f} s after SIGTERM"
    assert "exiting anyway" in daemon.text()
