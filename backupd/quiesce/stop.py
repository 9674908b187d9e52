"""Stop containers for the volume copy, and always start them again.

Each container is written to the catalog *before* it is stopped, so if
backupd dies (even SIGKILL) the next backupd to touch the engine starts it
again (`recover_held_containers`). Containers that were not running are left
alone. With Compose labels, dependents stop first and start last.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from docker.errors import DockerException, NotFound

from backupd.catalog import Catalog
from backupd.config import ContainerSelector
from backupd.docker_host import HELPER_LABEL, DockerHost
from backupd.errors import BackupdError, NotFoundError

log = logging.getLogger(__name__)
STOP_TIMEOUT = 30
HEALTH_WAIT = 120.0  # seconds a restarted container may take to report healthy before its dependents start

PROJECT, SERVICE, DEPENDS = ("com.docker.compose.project", "com.docker.compose.service",
                             "com.docker.compose.depends_on")


def resolve_containers(host: DockerHost, job: str, selectors: list[ContainerSelector]) -> list[Any]:
    """Running containers named by `stop_containers:`; unknown names fail before anything runs."""
    found: dict[str, Any] = {}
    for i, sel in enumerate(selectors):
        where = f"jobs.{job}.stop_containers[{i}]"
        if sel.name is not None:
            c = host.container(sel.name, where)
            if c.status == "running":
                found[c.id] = c
            else:
                log.info("%s: container %s is %s; leaving it as it is", where, c.name, c.status)
        else:
            matches = host.client.containers.list(filters={"label": sel.label})
            matches = [c for c in matches if HELPER_LABEL not in c.labels]
            if not matches:
                log.warning("%s: no running container has label %s", where, sel.label)
            found.update({c.id: c for c in matches})
    return stop_order(list(found.values()))


def stop_order(containers: list[Any]) -> list[Any]:
    """Dependents before what they depend on, else by name. A container depends on the services
    in its Compose depends_on label, and on the container whose network it shares
    (`network_mode: service:X`, which the engine shows as `container:<id>`)."""
    by_service = {(c.labels.get(PROJECT), c.labels.get(SERVICE)): c for c in containers if c.labels.get(SERVICE)}
    ids = {c.id for c in containers}

    def deps(c: Any) -> set[Any]:
        raw = c.labels.get(DEPENDS, "")
        names = {item.split(":")[0] for item in raw.split(",") if item}
        found = {by_service[(c.labels.get(PROJECT), n)].id for n in names
                 if (c.labels.get(PROJECT), n) in by_service}
        shared = network_owner(c)
        if shared is not None:
            found.update(i for i in ids if i == shared or i.startswith(shared))
        return found

    remaining = sorted(containers, key=lambda c: c.name)
    order: list[Any] = []
    while remaining:
        # stop a container nobody remaining depends on
        depended = set().union(*(deps(c) for c in remaining))
        ready = [c for c in remaining if c.id not in depended] or remaining[:1]  # cycles: by name
        order.append(ready[0])
        remaining.remove(ready[0])
    return order


def network_owner(container: Any) -> str | None:
    """The id (or name) of the container whose network namespace this one joins, if any."""
    attrs = getattr(container, "attrs", None) or {}
    mode = (attrs.get("HostConfig") or {}).get("NetworkMode") or ""
    return mode.split(":", 1)[1] if mode.startswith("container:") else None


def wait_healthy(container: Any, timeout: float = HEALTH_WAIT) -> None:
    """After starting a container with a healthcheck, wait (bounded) until it reports healthy,
    so what depends on it (started next) finds it ready. Without a healthcheck: no wait."""
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        health = ((container.attrs.get("State") or {}).get("Health") or {}).get("Status")
        if health in (None, "healthy") or container.status != "running":
            return
        if time.monotonic() >= deadline:
            log.warning("container %s is still %s after %.0fs; starting what depends on it anyway",
                        container.name, health, timeout, extra={"container": container.name})
            return
        time.sleep(0.5)


@contextmanager
def held(catalog: Catalog, backup_id: str, containers: list[Any], owner: str | None = None,
         engine_id: str | None = None) -> Iterator[list[str]]:
    """Stop the containers for the duration of the block; start them again whatever happens.

    Yields a list that collects restart errors (the caller records them).
    """
    holds: list[tuple[int, Any]] = []
    problems: list[str] = []
    try:
        for c in containers:
            hold_id = catalog.hold_container(backup_id, c.id, c.name, owner, engine_id)
            log.info("stopping container %s", c.name, extra={"container": c.name})
            try:
                c.stop(timeout=STOP_TIMEOUT)
            except DockerException as exc:
                catalog.release_container(hold_id)
                raise BackupdError(f"cannot stop container {c.name}: {exc}") from None
            holds.append((hold_id, c))
        yield problems
    finally:
        # Reverse order: what others depend on starts first, and is healthy before they start.
        for n, (hold_id, c) in enumerate(reversed(holds)):
            log.info("starting container %s", c.name, extra={"container": c.name})
            try:
                c.start()
                catalog.release_container(hold_id)
                if n < len(holds) - 1:
                    wait_healthy(c)
            except DockerException as exc:
                problems.append(f"container {c.name} could not be started again: {exc}")
                log.error("container %s could not be started again: %s (will retry at next start)", c.name, exc)


def recover_held_containers(catalog: Catalog, host: DockerHost, owner_alive: Callable[[str | None], bool],
                            engine_id: str) -> list[str]:
    """Start containers a dead backupd left stopped on this engine; returns their names."""
    started = []
    for hold_id, container_id, name in catalog.held_containers(owner_alive, engine_id):
        try:
            c = host.client.containers.get(container_id)
        except NotFound:
            log.warning("container %s that backupd stopped no longer exists", name)
            catalog.release_container(hold_id)
            continue
        if c.status != "running":
            log.warning("starting container %s, left stopped by an interrupted backupd", name)
            try:
                c.start()
            except DockerException as exc:
                log.error("could not start container %s: %s", name, exc)
                continue
            started.append(name)
        catalog.release_container(hold_id)
    return started


__all__ = ["held", "recover_held_containers", "resolve_containers", "stop_order", "NotFoundError"]
