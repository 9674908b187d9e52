"""The catalog on a real PostgreSQL server: what several hosts sharing one catalog use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from sqlalchemy import URL, create_engine, text

from backupd.catalog import MIGRATIONS, Catalog

pytestmark = pytest.mark.integration

FIVE_GIB = 5 << 30  # past PostgreSQL's 32-bit INTEGER


@pytest.fixture
def catalog_url(postgres_container) -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    def url(database: str) -> URL:
        return URL.create("postgresql+psycopg2", username=postgres_container.user,
                          password=postgres_container.password, host=postgres_container.ip,
                          port=postgres_container.port, database=database)

    name = f"catalog_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    yield url(name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def test_a_backup_past_2_gib_is_recorded_listed_and_read_back(catalog_url):
    catalog = Catalog(catalog_url)
    started = datetime(2026, 11, 23, 3, 0, 5, 120000, tzinfo=timezone.utc)
    bid = catalog.start_backup("j", started)
    art = catalog.add_artifact(bid, "volume", "v", "volume:v", "zstd", None, {"local": "k"})
    catalog.finish_artifact(art, FIVE_GIB, "ab" * 32, {}, blocks=(4 << 20, b"\x01" * 32))
    assert catalog.finish_backup(bid) == "succeeded"

    [summary] = catalog.summaries(job="j")
    assert (summary.id, summary.size, summary.artifacts) == (bid, FIVE_GIB, 1)
    assert summary.started_at == started and summary.started[:19] == "2026-11-23 03:00:05"
    backup = catalog.get(bid)
    assert backup.size == FIVE_GIB and backup.started_at == started
    assert catalog.blocks(art) == (4 << 20, b"\x01" * 32)
    catalog.close()
    assert [b.id for b in Catalog(catalog_url).list()] == [bid]  # migrations are idempotent


def test_a_v2_catalog_is_migrated_in_place(catalog_url):
    """Release v2 stored artifact sizes as INTEGER and had no per-backup totals."""
    old = Catalog(catalog_url)
    bid = old.start_backup("j")
    for name, size in (("a", 100), ("b", 23)):
        old.finish_artifact(old.add_artifact(bid, "volume", name, f"volume:{name}", "zstd", None,
                                             {"local": name}), size, "ab" * 32, {})
    with old.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_backups_list"))
        conn.execute(text("ALTER TABLE backups DROP COLUMN total_size, DROP COLUMN artifact_count"))
        conn.execute(text("ALTER TABLE artifacts ALTER COLUMN size TYPE INTEGER"))
        conn.execute(text("DELETE FROM backupd_schema WHERE version >= 3"))
    old.close()

    catalog = Catalog(catalog_url)
    assert [(s.size, s.artifacts) for s in catalog.summaries()] == [(123, 2)]
    big = catalog.add_artifact(bid, "volume", "c", "volume:c", "zstd", None, {"local": "c"})
    catalog.finish_artifact(big, FIVE_GIB, "cd" * 32, {})
    assert [(s.size, s.artifacts) for s in catalog.summaries()] == [(123 + FIVE_GIB, 3)]


def test_hosts_starting_together_on_a_new_shared_catalog_all_start_and_migrate_it_once(catalog_url):
    """Migrations run under an advisory lock: the losers wait, find the schema done, carry on."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys; from backupd.catalog import Catalog; Catalog(sys.argv[1]).list()"
    repo = Path(__file__).resolve().parents[2]
    procs = [subprocess.Popen([sys.executable, "-c", code, catalog_url], stderr=subprocess.PIPE, text=True,
                              cwd=repo) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    engine = create_engine(catalog_url)
    with engine.connect() as conn:
        versions = [v for (v,) in conn.execute(text("SELECT version FROM backupd_schema ORDER BY version"))]
    engine.dispose()
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_leases_are_shared_by_processes_on_a_postgresql_catalog(catalog_url):
    """Two hosts on one catalog: the second taker of a lease is refused while the first lives."""
    from backupd.catalog import utcnow
    from backupd.catalog.leases import LeaseBusy, Leases
    from backupd.identity import Identity, Liveness, this_process

    catalog = Catalog(catalog_url)
    other_host = Identity(id=uuid.uuid4().hex, hostname="other", pid_ns="pid:[1]", pid=1, pid_start="1",
                          command="run")
    first = Leases(catalog.session_factory, Liveness(other_host), utcnow)
    second = Leases(catalog.session_factory, Liveness(this_process("backup")), utcnow)
    assert first.try_acquire(["job:a", "volume:v"], "h1", "backup of job a") is None
    with pytest.raises(LeaseBusy, match="job:a is held by backupd run"):
        with second.hold(["job:a"], "backup of job a", wait=0):
            pass
    first.release("h1")
    with second.hold(["job:a"], "backup of job a", wait=0):
        pass
    first.close()
    second.close()
    catalog.close()
