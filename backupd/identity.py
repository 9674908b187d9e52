"""Who "this backupd" is, and whether another backupd process is still alive.

The catalog records an owner for every lease, running backup and stopped
container, so that whoever comes next can tell a live owner (leave its work
alone) from a dead one (take over its leases, fail its runs, restart its
containers). The hostname is not an identity: Compose gives a recreated
sidecar container a new one. What proves an owner dead, strongest first:

1. the same pid namespace: its pid no longer runs with the same start time;
2. the same Docker engine: the container it ran in is gone, stopped, or was
   started again since (a restarted container runs a new process);
3. otherwise (another host sharing a PostgreSQL catalog): its heartbeat is
   older than the lease TTL.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable, Protocol

HEARTBEAT_EVERY = timedelta(seconds=15)
LEASE_TTL = timedelta(minutes=2)  # a heartbeat older than this is a dead owner's


def pid_start(pid: int) -> str | None:
    """Kernel start time of a process (clock ticks since boot): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_token() -> str:
    """"pid:start time" of this process: how rows written before schema v4 name their owner."""
    pid = os.getpid()
    return f"{pid}:{pid_start(pid) or ''}"


def process_alive(token: str) -> bool:
    """Is the process that wrote this token (in this pid namespace) still running?"""
    pid_text, _, start = token.partition(":")
    if not pid_text.isdigit():
        return False
    current = pid_start(int(pid_text))
    return current is not None and current == start


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Identity:
    """One backupd process, as recorded in the catalog's owners table."""

    id: str
    hostname: str
    pid_ns: str
    pid: int
    pid_start: str
    command: str
    engine_id: str | None = None
    container_id: str | None = None
    container_started: str | None = None

    def with_engine(self, engine_id: str, container_id: str | None, container_started: str | None) -> Identity:
        return replace(self, engine_id=engine_id, container_id=container_id,
                       container_started=container_started)

    def describe(self) -> str:
        """For log lines and refusals: which process holds something."""
        where = f"container {self.container_id[:12]}" if self.container_id else f"host {self.hostname}"
        return f"backupd {self.command} (pid {self.pid} in {where})"


def this_process(command: str) -> Identity:
    pid = os.getpid()
    return Identity(id=uuid.uuid4().hex, hostname=socket.gethostname(), pid_ns=_pid_namespace(),
                    pid=pid, pid_start=pid_start(pid) or "", command=command)


class ContainerState(Protocol):
    """What the engine says of a container: (running, started at) or None when it is gone."""

    def __call__(self, container_id: str) -> tuple[bool, str] | None: ...


@dataclass(frozen=True)
class Liveness:
    """Judges other owners from this process's point of view."""

    me: Identity
    container_state: ContainerState | None = None  # set once the engine is connected
    ttl: timedelta = LEASE_TTL

    def alive(self, other: Identity, heartbeat_at: datetime, now: datetime) -> bool:
        if other.id == self.me.id:
            return True
        if other.pid_ns and other.pid_ns == self.me.pid_ns:
            start = pid_start(other.pid)
            return start is not None and start == other.pid_start
        if (self.container_state is not None and other.container_id
                and other.engine_id == self.me.engine_id):
            state = self.container_state(other.container_id)
            if state is None or not state[0] or state[1] != other.container_started:
                return False
        return now - heartbeat_at < self.ttl


Clock = Callable[[], datetime]
