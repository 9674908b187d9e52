"""SQLite and Redis dumps in repository mode, end to end on the real engine: the archive mode's
SQLite writer and redis-server, dumped through `restic backup --stdin` into a local repository
and put back through `restic dump`; what comes back is the snapshot's file byte for byte and the
data key for key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.services import DB_IMAGE, wait_until
from tests.integration.test_repository import repo_config, restic_image  # noqa: F401 - fixture
from tests.integration.test_sqlite_redis import (APP_UID, consistent, live_rows, redis_cli,  # noqa: F401
                                                 redis_server, sqlite_app)
from tests.integration.test_volumes import backupd, listing, mountpoint

pytestmark = pytest.mark.integration

# Every key with its type and value, in key order, hashed inside Redis: equal means key for key.
REDIS_FINGERPRINT = """
local keys = redis.call('KEYS', '*')
table.sort(keys)
local out = {}
for _, k in ipairs(keys) do
  local t = redis.call('TYPE', k).ok
  local v
  if t == 'string' then v = redis.call('GET', k)
  elseif t == 'hash' then v = table.concat(redis.call('HGETALL', k), ',')
  else v = '?' .. t end
  out[#out + 1] = k .. '=' .. t .. ':' .. v
end
return #keys .. ' ' .. redis.sha1hex(table.concat(out, '|'))
"""


def snapshot_file(tmp_path: Path, artifact: dict) -> bytes:
    """The file a dump's snapshot holds, read with the host's restic as a user would."""
    [copy] = artifact["destinations"]
    assert copy["status"] == "stored" and copy["snapshot_id"], copy
    proc = subprocess.run(["restic", "dump", "--quiet", copy["snapshot_id"], f"/database-{artifact['name']}"],
                          capture_output=True, timeout=120,
                          env={**os.environ, "RESTIC_REPOSITORY": str(tmp_path / "backups" / "_restic" / "j"),
                               "RESTIC_PASSWORD_FILE": str(tmp_path / "password"),
                               "RESTIC_CACHE_DIR": str(tmp_path / "host-cache")})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_sqlite_dumped_into_the_repository_while_written_restores_the_snapshot_byte_for_byte(
        docker_client, helper_image, restic_image, sqlite_app, tmp_path):
    app, vol = sqlite_app
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"databases": [
        {"name": "appdb", "type": "sqlite", "container": app.name, "path": "/data/app.db",
         "image": DB_IMAGE}]}})
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    [entry] = listing(config)
    [art] = entry["artifacts"]
    assert entry["status"] == "succeeded" and art["source"] == f"sqlite:{app.name}/%2Fdata%2Fapp.db"
    stored = snapshot_file(tmp_path, art)
    (tmp_path / "copy.db").write_bytes(stored)
    rows, starts = consistent(tmp_path / "copy.db")  # one moment of a database written all along
    assert rows > 0 and starts == 1

    # The writer goes on after the backup; stopped, its file is what a restore must replace.
    assert live_rows(app) > 0
    app.stop(timeout=10)
    data = mountpoint(docker_client, vol)
    assert (data / "app.db").read_bytes() != stored
    refused = backupd(config, "restore", backup_id, "--database", "appdb")
    assert refused.returncode == 3 and "--force" in refused.stderr, refused.stderr[-800:]
    restored = backupd(config, "restore", backup_id, "--database", "appdb", "--force")
    assert restored.returncode == 0, restored.stderr[-800:]
    assert (data / "app.db").read_bytes() == stored
    assert (data / "app.db").stat().st_uid == APP_UID, "the restored file belongs to the application"
    assert not [p.name for p in data.iterdir() if ".backupd-" in p.name or p.name.endswith(("-wal", "-journal"))]
    app.reload()
    assert app.status == "exited", "a container that was not running is not started by a restore"
    logs = "".join(p.stdout + p.stderr for p in (proc, refused, restored))
    assert password not in logs


def test_redis_dumped_into_the_repository_restores_key_for_key_with_redis_stopped(
        docker_client, helper_image, restic_image, redis_server, tmp_path):
    c, vol, password = redis_server
    redis_cli(c, password, "SET", "bin", "\x01\x02 ✓ \x7f")
    before = redis_cli(c, password, "EVAL", REDIS_FINGERPRINT, "0")
    assert before.startswith("1002 ")
    config, repository_password = repo_config(tmp_path, helper_image, restic_image, {"j": {"databases": [
        {"name": "cache", "type": "redis", "container": c.name}]}})
    proc = backupd(config, "backup", "j", check=True)
    backup_id = proc.stdout.strip()
    [art] = listing(config)[0]["artifacts"]
    assert art["source"] == f"redis:{c.name}/*all" and art["status"] == "succeeded"
    stored = snapshot_file(tmp_path, art)
    assert stored[:5] == b"REDIS"

    redis_cli(c, password, "FLUSHALL")
    redis_cli(c, password, "SET", "marker", "after the backup")
    refused = backupd(config, "restore", backup_id, "--database", "cache")
    assert refused.returncode == 3 and "holds 1 keys" in refused.stderr, refused.stderr[-800:]
    c.reload()
    started = c.attrs["State"]["StartedAt"]

    restored = backupd(config, "restore", backup_id, "--database", "cache", "--force")
    assert restored.returncode == 0, restored.stderr[-800:]
    c.reload()
    assert c.status == "running" and c.attrs["State"]["StartedAt"] != started, "stopped and started again"
    wait_until(lambda: c.exec_run(["redis-cli", "--no-auth-warning", "ping"],
                                  environment={"REDISCLI_AUTH": password}).output.strip() == b"PONG",
               "redis-server after the restore", 30)
    assert redis_cli(c, password, "EVAL", REDIS_FINGERPRINT, "0") == before
    assert redis_cli(c, password, "EXISTS", "marker") == "0"
    assert (mountpoint(docker_client, vol) / "dump.rdb").read_bytes() == stored
    logs = "".join(p.stdout + p.stderr for p in (proc, refused, restored))
    assert password not in logs and repository_password not in logs
