"""Leases in the catalog: one run per resource across threads, processes and hosts, and the
lease of a dead owner taken over. Real processes on a real SQLite catalog where it matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.catalog import MIGRATIONS, Catalog, utcnow
from backupd.catalog.leases import LeaseBusy, Leases, Stopping
from backupd.catalog.models import OwnerRow
from backupd.identity import LEASE_TTL, Identity, Liveness, this_process

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def leases_of(catalog: Catalog, identity: Identity | None = None, **liveness: Any) -> Leases:
    return Leases(catalog.session_factory, Liveness(identity or this_process("test"), **liveness), utcnow,
                  poll=0.01)


def add_owner(catalog: Catalog, identity: Identity, heartbeat: datetime) -> None:
    with catalog.session_factory.begin() as s:
        s.add(OwnerRow(id=identity.id, hostname=identity.hostname, pid_ns=identity.pid_ns, pid=identity.pid,
                       pid_start=identity.pid_start, engine_id=identity.engine_id,
                       container_id=identity.container_id, container_started=identity.container_started,
                       command=identity.command, started_at=heartbeat, heartbeat_at=heartbeat))


def foreign(pid_ns: str = "pid:[1]", **kw: Any) -> Identity:
    """An owner in another pid namespace (another container or host)."""
    return Identity(id=os.urandom(8).hex(), hostname="elsewhere", pid_ns=pid_ns, pid=1, pid_start="5",
                    command="run", **kw)


def test_a_held_resource_is_refused_to_a_second_run_with_who_holds_it(catalog: Catalog) -> None:
    leases = leases_of(catalog)
    with leases.hold(["job:a", "volume:v"], "backup of job a"):
        with pytest.raises(LeaseBusy, match=r"job:a is held by backupd test \(pid \d+ in host .*\) for backup of job a"):
            with leases.hold(["job:a"], "backup of job a", wait=0):
                pass
    with leases.hold(["job:a"], "again", wait=0):  # released on exit
        assert [r for r, _, _ in leases.held()] == ["job:a"]
    assert leases.held() == []


def test_all_or_nothing_a_partial_take_is_given_back(catalog: Catalog) -> None:
    leases = leases_of(catalog)
    with leases.hold(["volume:v"], "first"):
        with pytest.raises(LeaseBusy):
            with leases.hold(["job:b", "volume:v"], "second", wait=0):
                pass
        assert [r for r, _, _ in leases.held()] == ["volume:v"]


def test_opposite_orders_never_deadlock(catalog: Catalog) -> None:
    leases = leases_of(catalog)
    done: list[int] = []

    def worker(names: list[str], n: int) -> None:
        for _ in range(30):
            with leases.hold(names, f"worker {n}"):
                pass
        done.append(n)

    threads = [threading.Thread(target=worker, args=(["volume:b", "volume:a"], 1)),
               threading.Thread(target=worker, args=(["volume:a", "volume:b"], 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == [1, 2] and leases.held() == []


def test_a_run_waiting_for_a_busy_resource_gives_up_when_backupd_stops(catalog: Catalog) -> None:
    leases, stop = leases_of(catalog), threading.Event()
    told: list[str] = []
    with leases.hold(["volume:v"], "first"):
        threading.Timer(0.1, stop.set).start()
        with pytest.raises(Stopping, match="volume:v"):
            with leases.hold(["job:b", "volume:v"], "second", stop=stop, on_wait=lambda c: told.append(str(c))):
                pass
    assert len(told) == 1 and "volume:v is held by" in told[0]
    assert leases.held() == []


def test_the_lease_of_a_dead_process_in_this_pid_namespace_is_taken_over(
        catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    me = this_process("test")
    dead = Identity(id="dead0", hostname="h", pid_ns=me.pid_ns, pid=4_000_000, pid_start="1", command="run")
    other = leases_of(catalog, dead)  # registers with a fresh heartbeat: no help for a pid that is gone
    other.try_acquire(["job:a"], "h1", "backup of job a")
    leases = leases_of(catalog, me)
    with leases.hold(["job:a"], "mine", wait=0):
        assert [o for _, o, _ in leases.held()] == [me.id]
    assert any("took over job:a" in r.getMessage() for r in caplog.records)


def test_an_owner_on_another_host_is_alive_while_it_heartbeats(catalog: Catalog) -> None:
    far = foreign()
    leases_of(catalog, far).try_acquire(["job:a"], "h1", "backup of job a")
    leases = leases_of(catalog)
    with pytest.raises(LeaseBusy):
        with leases.hold(["job:a"], "mine", wait=0):
            pass
    with catalog.session_factory.begin() as s:  # it stops heartbeating: a crashed host
        s.get(OwnerRow, far.id).heartbeat_at = utcnow() - LEASE_TTL - timedelta(seconds=1)
    with leases.hold(["job:a"], "mine", wait=0):
        pass


def test_an_owner_whose_container_is_gone_stopped_or_restarted_is_dead_at_once(catalog: Catalog) -> None:
    me = this_process("test").with_engine("E1", None, None)
    states: dict[str, tuple[bool, str] | None] = {}
    liveness = Liveness(me, container_state=lambda cid: states.get(cid))
    boxed = foreign(engine_id="E1", container_id="c1", container_started="T1")
    assert liveness.alive(boxed, utcnow(), utcnow()) is False  # gone
    states["c1"] = (True, "T1")
    assert liveness.alive(boxed, utcnow(), utcnow()) is True  # running since it registered
    states["c1"] = (True, "T2")
    assert liveness.alive(boxed, utcnow(), utcnow()) is False  # restarted: a new process
    states["c1"] = (False, "T1")
    assert liveness.alive(boxed, utcnow(), utcnow()) is False  # stopped
    elsewhere = foreign(engine_id="E2", container_id="c1", container_started="T1")
    assert liveness.alive(elsewhere, utcnow(), utcnow()) is True  # another engine: heartbeat decides


def test_close_releases_this_owners_leases(catalog: Catalog) -> None:
    leases = leases_of(catalog)
    leases.try_acquire(["job:a", "volume:v"], "h", "left behind")
    leases.close()
    assert leases.held() == []


def test_dead_owners_that_nothing_refers_to_are_forgotten(catalog: Catalog) -> None:
    me = this_process("test")
    gone = Identity(id="gone0", hostname="h", pid_ns=me.pid_ns, pid=4_000_000, pid_start="1", command="run")
    held = Identity(id="held0", hostname="h", pid_ns=me.pid_ns, pid=4_000_001, pid_start="1", command="run")
    for owner in (gone, held):
        add_owner(catalog, owner, utcnow())
    leases = leases_of(catalog, me)
    leases.register()
    assert leases.forget_dead_owners(lambda owner: owner == "held0") == 1
    with catalog.session_factory() as s:
        assert sorted(s.get(OwnerRow, i) is not None for i in ("gone0", "held0", me.id)) == [False, True, True]


# ---------------------------------------------------------------- real processes

HOLDER = textwrap.dedent("""
    import json, sys, time
    from backupd.catalog import Catalog, utcnow
    from backupd.catalog.leases import Leases
    from backupd.identity import Liveness, this_process
    catalog = Catalog(sys.argv[1])
    leases = Leases(catalog.session_factory, Liveness(this_process("test")), utcnow, poll=0.05)
    with leases.hold(["job:a"], "backup of job a"):
        start = time.time()
        print("holding", flush=True)
        time.sleep(float(sys.argv[2]))
        end = time.time()
    print(json.dumps([start, end]), flush=True)
""")


def spawn(url: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, url, str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)


def test_two_processes_never_hold_one_job_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(url).close()
    procs = [spawn(url, 0.5) for _ in range(3)]
    spans = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        spans.append(json.loads(out.splitlines()[-1]))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_a_killed_holders_lease_is_taken_over_by_the_next_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    holder = spawn(url, 600)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    started = time.monotonic()
    nxt = spawn(url, 0)
    out, _ = nxt.communicate(timeout=60)
    assert nxt.returncode == 0 and time.monotonic() - started < 10


def test_processes_racing_on_a_new_catalog_all_start_and_migrate_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    code = "import sys; from backupd.catalog import Catalog; Catalog(sys.argv[1]).list()"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    import sqlite3

    versions = sqlite3.connect(tmp_path / "new.db").execute("select version from backupd_schema").fetchall()
    assert sorted(versions) == [(v,) for v in range(1, len(MIGRATIONS) + 1)]




def test_only_owners_this_catalog_knows_can_be_judged_dead(catalog: Catalog) -> None:
    """A helper labelled by another backupd with a catalog of its own is not ours to remove."""
    me = this_process("test")
    dead = Identity(id="dead1", hostname="h", pid_ns=me.pid_ns, pid=4_000_000, pid_start="1", command="run")
    add_owner(catalog, dead, utcnow())
    leases = leases_of(catalog, me)
    assert leases.owner_known_dead("dead1") is True
    assert leases.owner_known_dead("not-in-this-catalog") is False
    assert leases.owner_known_dead(None) is False and leases.owner_known_dead(me.id) is False
    assert leases.owner_alive("not-in-this-catalog") is False  # what our own rows may refer to
