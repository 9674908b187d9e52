"""Leases: which backupd process may touch a job, a volume or a container right now.

A lease is a row keyed by the resource name, so taking one is a single insert
that the database itself refuses to a second taker, on SQLite and PostgreSQL
alike: two backupd processes (the daemon and a CLI command, or two hosts on
one catalog) never run conflicting work. Every holder is an owner row that
heartbeats; the lease of an owner proven dead (see backupd.identity) is taken
over, with a log line, instead of blocking the resource forever.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Callable, Iterable, Iterator

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from backupd.catalog.models import LeaseRow, OwnerRow
from backupd.errors import BackupdError
from backupd.identity import HEARTBEAT_EVERY, ContainerState, Identity, Liveness

log = logging.getLogger(__name__)

WAIT_LOG_EVERY = 30.0  # seconds between "still waiting" lines


class LeaseBusy(BackupdError):
    """A resource is held by another live run (the CLI's --no-wait, or a wait that timed out)."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class Stopping(BackupdError):
    """backupd is stopping: a run that had not started yet is not started."""


@dataclass(frozen=True)
class Conflict:
    resource: str
    holder: str  # who holds it, for humans
    purpose: str
    since: datetime

    def __str__(self) -> str:
        return f"{self.resource} is held by {self.holder} for {self.purpose} since {self.since:%Y-%m-%d %H:%M:%S}Z"


def _identity(row: OwnerRow) -> Identity:
    return Identity(id=row.id, hostname=row.hostname, pid_ns=row.pid_ns, pid=row.pid, pid_start=row.pid_start,
                    command=row.command, engine_id=row.engine_id, container_id=row.container_id,
                    container_started=row.container_started)


class Leases:
    """This process's owner row, its heartbeat, and the leases it takes."""

    def __init__(self, session: sessionmaker[Session], liveness: Liveness,
                 clock: Callable[[], datetime], poll: float = 1.0) -> None:
        self._session = session  # the catalog's sessionmaker
        self.liveness = liveness
        self.clock = clock
        self.poll = poll
        self._registered = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def me(self) -> Identity:
        return self.liveness.me

    def set_identity(self, identity: Identity, container_state: ContainerState | None) -> None:
        """What the engine adds to who we are (engine id, own container), once it is connected."""
        assert identity.id == self.me.id
        self.liveness = replace(self.liveness, me=identity, container_state=container_state)
        with self._lock:
            if not self._registered:
                return
        with self._session.begin() as s:
            s.execute(update(OwnerRow).where(OwnerRow.id == identity.id).values(
                engine_id=identity.engine_id, container_id=identity.container_id,
                container_started=identity.container_started))

    # ------------------------------------------------------------ this owner

    def register(self) -> str:
        """Write this process's owner row (once) and start its heartbeat; returns the owner id."""
        with self._lock:
            if self._registered:
                return self.me.id
            me, now = self.me, self.clock()
            with self._session.begin() as s:
                s.add(OwnerRow(id=me.id, hostname=me.hostname, pid_ns=me.pid_ns, pid=me.pid,
                               pid_start=me.pid_start, engine_id=me.engine_id, container_id=me.container_id,
                               container_started=me.container_started, command=me.command,
                               started_at=now, heartbeat_at=now))
            self._registered = True
            self._beat = threading.Thread(target=self._heartbeat, name="backupd-heartbeat", daemon=True)
            self._beat.start()
            return me.id

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY.total_seconds()):
            try:
                with self._session.begin() as s:
                    s.execute(update(OwnerRow).where(OwnerRow.id == self.me.id)
                              .values(heartbeat_at=self.clock()))
            except SQLAlchemyError as exc:  # the catalog may come back; the next beat tries again
                log.warning("catalog heartbeat failed: %s", type(exc).__name__)

    def close(self) -> None:
        """Stop the heartbeat, drop this owner's leases and, if nothing refers to it, its row."""
        self._stop.set()
        if not self._registered:
            return
        try:
            with self._session.begin() as s:
                s.execute(delete(LeaseRow).where(LeaseRow.owner == self.me.id))
        except SQLAlchemyError as exc:
            log.warning("could not release leases at exit: %s (a later backupd takes them over)",
                        type(exc).__name__)

    # ------------------------------------------------------------ other owners

    def owner_alive(self, owner_id: str | None) -> bool:
        """Is the process behind this owner id alive? An unknown owner is not."""
        if not owner_id:
            return False
        if owner_id == self.me.id:
            return True
        with self._session() as s:
            row = s.get(OwnerRow, owner_id)
            if row is None:
                return False
            return self.liveness.alive(_identity(row), row.heartbeat_at, self.clock())

    def owner_known_dead(self, owner_id: str | None) -> bool:
        """Is this one of our catalog's owners, and dead? Things labelled with an owner this
        catalog does not know (helpers of another backupd on the same engine, with a catalog
        of its own) are not ours to judge."""
        if not owner_id or owner_id == self.me.id:
            return False
        with self._session() as s:
            row = s.get(OwnerRow, owner_id)
            if row is None:
                return False
            return not self.liveness.alive(_identity(row), row.heartbeat_at, self.clock())

    def describe_owner(self, owner_id: str) -> str:
        with self._session() as s:
            row = s.get(OwnerRow, owner_id)
            return _identity(row).describe() if row is not None else f"a backupd that is gone ({owner_id[:8]})"

    def forget_dead_owners(self, still_referenced: Callable[[str], bool]) -> int:
        """Remove owner rows of dead processes that nothing refers to any more."""
        removed = 0
        with self._session() as s:
            ids = list(s.scalars(select(OwnerRow.id).where(OwnerRow.id != self.me.id)))
        for owner_id in ids:
            if not self.owner_alive(owner_id) and not still_referenced(owner_id):
                with self._session.begin() as s:
                    s.execute(delete(OwnerRow).where(OwnerRow.id == owner_id))
                removed += 1
        return removed

    # ------------------------------------------------------------ leases

    def try_acquire(self, resources: Iterable[str], holder: str, purpose: str) -> Conflict | None:
        """Take every resource or none; the first one held by a live run is returned."""
        self.register()
        taken: list[str] = []
        for resource in sorted(set(resources)):
            conflict = self._take(resource, holder, purpose)
            if conflict is not None:
                self.release(holder, taken)
                return conflict
            taken.append(resource)
        return None

    def _take(self, resource: str, holder: str, purpose: str) -> Conflict | None:
        for _ in range(3):  # a dead owner's lease removed, then inserted: a racer may win in between
            try:
                with self._session.begin() as s:
                    s.add(LeaseRow(resource=resource, owner=self.me.id, holder=holder, purpose=purpose,
                                   since=self.clock()))
                return None
            except DbIntegrityError:
                pass
            with self._session() as s:
                row = s.get(LeaseRow, resource)
                if row is None:
                    continue  # released meanwhile
                owner, other, other_purpose, since = row.owner, row.holder, row.purpose, row.since
            if self.owner_alive(owner):
                return Conflict(resource, self.describe_owner(owner), other_purpose, since)
            with self._session.begin() as s:
                result = s.execute(delete(LeaseRow).where(LeaseRow.resource == resource,
                                                          LeaseRow.holder == other))
                gone = result.rowcount  # type: ignore[attr-defined]  # a CursorResult for DML
            if gone:
                log.warning("took over %s from %s, which is no longer running (it held it for %s)",
                            resource, self.describe_owner(owner), other_purpose)
        return Conflict(resource, "another backupd", "a contended lease", self.clock())

    def release(self, holder: str, resources: Iterable[str] | None = None) -> None:
        query = delete(LeaseRow).where(LeaseRow.holder == holder)
        if resources is not None:
            names = list(resources)
            if not names:
                return
            query = query.where(LeaseRow.resource.in_(names))
        with self._session.begin() as s:
            s.execute(query)

    @contextmanager
    def hold(self, resources: Iterable[str], purpose: str, *, stop: threading.Event | None = None,
             wait: float | None = None, on_wait: Callable[[Conflict], None] | None = None) -> Iterator[str]:
        """Hold every resource for the block; yields the holder id.

        While another live run holds one of them: wait (polling), calling `on_wait` at
        first and then every WAIT_LOG_EVERY seconds; raise Stopping if `stop` is set, or
        LeaseBusy once `wait` seconds have passed (0: refuse at once; None: no limit).
        """
        names = sorted(set(resources))
        holder = uuid.uuid4().hex
        started = time.monotonic()
        told = None
        while True:
            if stop is not None and stop.is_set():
                raise Stopping("stopped before the run started")
            conflict = self.try_acquire(names, holder, purpose)
            if conflict is None:
                break
            waited = time.monotonic() - started
            if wait is not None and waited >= wait:
                raise LeaseBusy(f"{conflict}; try again later")
            if on_wait is not None and (told is None or time.monotonic() - told >= WAIT_LOG_EVERY):
                on_wait(conflict)
                told = time.monotonic()
            if stop is not None:
                if stop.wait(self.poll):
                    raise Stopping(f"stopped while waiting for {conflict.resource}")
            else:
                time.sleep(self.poll)
        try:
            yield holder
        finally:
            try:
                self.release(holder)
            except SQLAlchemyError as exc:
                log.error("could not release %s: %s (taken over once this process is gone)",
                          ", ".join(names), type(exc).__name__)

    def held(self) -> list[tuple[str, str, str]]:
        """(resource, owner id, purpose) of every lease in the catalog."""
        with self._session() as s:
            return [(r.resource, r.owner, r.purpose) for r in s.scalars(select(LeaseRow).order_by(LeaseRow.resource))]
