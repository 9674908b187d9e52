"""SQLite and Redis entries: what the config accepts, what reaches the tools, and the copy and
restore script itself, run here against real SQLite files (the helper container that runs it
in production is crossed in tests/integration/test_sqlite_redis.py)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backupd.config import DatabaseSpec, parse_config
from backupd.errors import ConfigError
from backupd.quiesce import redis, sqlite
from backupd.quiesce.databases import make_source, marker_source, parse_source


def entry(**fields):
    return {"jobs": {"j": {"databases": [{"name": "d", **fields}]}}}


@pytest.mark.parametrize("fields, why", [
    ({"type": "sqlite", "container": "app"}, "absolute path of the database file"),
    ({"type": "sqlite", "container": "app", "path": "data/app.db"}, "absolute path"),
    ({"type": "sqlite", "container": "app", "path": "/data/"}, "absolute path"),
    ({"type": "sqlite", "host": "db", "path": "/a.db"}, "host: is not supported"),
    ({"type": "sqlite", "container": "app", "path": "/a.db", "options": ["-x"]}, "options do not apply"),
    ({"type": "sqlite", "container": "app", "path": "/a.db", "database": "main"}, "database does not apply"),
    ({"type": "redis", "container": "r", "database": "0"}, "database does not apply"),
    ({"type": "postgres", "container": "pg", "path": "/a.db"}, "apply to type: sqlite only"),
])
def test_bad_sqlite_and_redis_entries_are_config_errors_naming_the_entry(fields, why):
    with pytest.raises(ConfigError, match=rf"^c: jobs\.j\.databases\[0\]: .*{why}"):
        parse_config(entry(**fields), "c", env={})


def test_redis_password_travels_in_the_environment_never_in_argv():
    spec = DatabaseSpec(name="r", type="redis", host="cache", port=6380, user="backup", password="s3cret-pw")
    argv = redis.dump_everything(spec, {})
    assert argv == ["redis-cli", "--no-auth-warning", "-h", "cache", "-p", "6380", "--user", "backup",
                    "--rdb", "-"]
    assert "s3cret-pw" not in " ".join(argv)
    assert redis.password_env("s3cret-pw") == {"REDISCLI_AUTH": "s3cret-pw"}
    assert redis.password_env(None) == {}


def test_sources_carry_the_sqlite_path_and_the_redis_server():
    source = parse_source(make_source("sqlite", "app", "/data/my app/x.db"))
    assert (source.kind, source.server, source.database) == ("sqlite", "app", "/data/my app/x.db")
    source = parse_source(marker_source("redis", "cache", "all"))
    assert (source.kind, source.server, source.database, source.marker) == ("redis", "cache", None, "all")


def run_script(mode: str, path: Path, stdin: bytes = b"", temp: Path | None = None) -> subprocess.CompletedProcess:
    """The helper's script as the helper runs it (as root it becomes the file's owner; here it
    already is, and setuid to oneself is allowed); `temp`: its TMPDIR."""
    env = {**os.environ, "TMPDIR": str(temp)} if temp is not None else None
    return subprocess.run([sys.executable, *sqlite.command(mode, str(path))[1:]], input=stdin,
                          capture_output=True, env=env)


def make_db(path: Path, rows: int) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    db.commit()
    db.close()


@pytest.mark.skipif(os.getuid() != 0, reason="setgroups needs root, as in the helper")
def test_the_copy_script_copies_probes_and_restores_a_wal_database(tmp_path: Path):
    live = tmp_path / "live.db"
    make_db(live, 100)
    holder = sqlite3.connect(live)  # an open connection keeps the WAL: the copy must read it too
    holder.execute("INSERT INTO t VALUES (100)")
    holder.commit()

    temp = tmp_path / "tmp"
    temp.mkdir()
    dump = run_script("dump", live, temp=temp)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout[:16] == b"SQLite format 3\x00"
    assert list(temp.iterdir()) == [], "no copy of the database stays behind"
    assert run_script("probe", live).stdout.strip() == b"1"
    assert run_script("probe", tmp_path / "none.db").stdout.strip() == b"missing"
    holder.close()

    target = tmp_path / "target.db"
    make_db(target, 5)
    (tmp_path / "target.db-wal").write_bytes(b"stale WAL of the old database")
    restored = run_script("restore", target, dump.stdout)
    assert restored.returncode == 0, restored.stderr
    assert not (tmp_path / "target.db-wal").exists(), "the old WAL would have been applied to the new file"
    assert not [p.name for p in tmp_path.iterdir() if ".backupd-" in p.name], "no temporary file left"
    assert sqlite3.connect(target).execute("SELECT count(*) FROM t").fetchone() == (101,)


@pytest.mark.skipif(os.getuid() != 0, reason="setgroups needs root, as in the helper")
def test_the_restore_script_refuses_bytes_that_are_no_database_and_leaves_the_file(tmp_path: Path):
    target = tmp_path / "target.db"
    make_db(target, 5)
    before = target.read_bytes()
    failed = run_script("restore", target, b"not a database" * 100)
    assert failed.returncode == 2 and failed.stderr.startswith(b"error: ") and b"not a database" in failed.stderr
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["target.db"], "no temporary file left"
    missing = run_script("dump", tmp_path / "none.db")
    assert missing.returncode == 2 and b"does not exist" in missing.stderr
