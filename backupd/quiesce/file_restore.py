"""restore --database for databases kept in one file (SQLite, Redis): put the file back with the
container stopped, and start it again whatever happens.

Unlike a PostgreSQL or MySQL dump, which is fed to the running server, these replace
a file the server holds open: so the container is stopped first (recorded in the
catalog like a backup's, so a crash does not leave it down), a helper that mounts
the file's volume writes the file under a temporary name and renames it into place,
and the container is started again. A database that holds data is refused without
--force, asked while it still runs, before anything is stopped; the copy is proven
before the container is stopped too.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from backupd.catalog import Catalog
from backupd.config import DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.errors import BackupdError, ConfigError, RefusedError
from backupd.quiesce import redis, sqlite
from backupd.quiesce.databases import DumpError, Source, Target, connect
from backupd.quiesce.runner import HelperRunner
from backupd.quiesce.stop import held

log = logging.getLogger(__name__)

Chunks = Callable[[], Iterable[bytes]]  # the proven copy, opened once the container is stopped


def restore_file(*, spec: DatabaseSpec, source: Source, host: DockerHost, catalog: Catalog, backup_id: str,
                 container: str | None, force: bool, prove: Callable[[], None], chunks: Chunks,
                 where: str) -> str:
    """Put a SQLite or Redis dump back into `container` (or the entry's own); returns where."""
    container = container or spec.container
    if container is None:
        raise ConfigError(f"{where}: a {source.kind} database reached over the network cannot be stopped by "
                          "backupd; restore into its container with --to-container C")
    c = host.container(container, where)
    if source.kind == "sqlite":
        path = source.database or spec.path
        assert path is not None
        runner = sqlite.runner(host, c, spec, where)
        found = _ask(runner, sqlite.command("probe", path), f"inspecting {path}")
        if found not in ("missing", "0") and not force:
            raise RefusedError(f"SQLite database {path} in container '{container}' is not empty ({found} schema "
                               "objects); pass --force to replace it (the container is stopped meanwhile)")
        put = sqlite.command("restore", path)
        what = path
    else:
        # Asked inside the container it is restored into, whatever host: the entry dumped from.
        spec = spec.model_copy(update={"host": None, "port": None, "container": container})
        target = connect(spec, host, where, container=container)
        if _ask(target.runner, redis.query(spec, "CONFIG", "GET", "appendonly"), "CONFIG GET appendonly",
                target, line=1) == "yes":
            raise RefusedError(f"Redis in container '{container}' has appendonly yes: it would load its "
                               "append-only file at start and ignore the dump; turn appendonly off for the "
                               "restore, or restore by hand")
        keys = int(_ask(target.runner, redis.query(spec, "DBSIZE"), "DBSIZE", target) or 0)
        if keys and not force:
            raise RefusedError(f"Redis in container '{container}' holds {keys} keys; pass --force to replace "
                               "them (the container is stopped meanwhile)")
        directory = _ask(target.runner, redis.query(spec, "CONFIG", "GET", "dir"), "CONFIG GET dir", target, line=1)
        name = _ask(target.runner, redis.query(spec, "CONFIG", "GET", "dbfilename"), "CONFIG GET dbfilename",
                    target, line=1)
        if not directory.startswith("/") or not name or "/" in name:
            raise BackupdError(f"{where}: Redis in container '{container}' reports dir {directory!r} and "
                               f"dbfilename {name!r}; cannot tell where its dump file lies")
        what = f"{directory.rstrip('/')}/{name}"
        runner = HelperRunner(host, [host.mount_holding(c, what, where)], None, redis.RESTORE_CAPS,
                              f"a helper for '{what}' of container '{container}'")
        put = redis.put_file(what)
    prove()  # before anything is stopped: a bad copy leaves the database running as it was
    with held(catalog, backup_id, [c] if c.status == "running" else []) as restart_problems:
        log.info("container %s stopped; putting %s back", container, what)
        with runner.stream(put, {}, stdin=chunks()) as proc:
            for _ in proc.stdout():
                pass
            code = proc.exit_code()
            feed_error = getattr(proc, "feed_error", None)
            if feed_error is not None:
                raise feed_error
            if code != 0:
                raise DumpError(f"putting {what} back in {runner.where} failed (exit {code}): "
                                f"{proc.stderr_text()[-500:] or 'no message'}")
    if restart_problems:
        raise BackupdError("; ".join(restart_problems))
    return f"container '{container}' ({what})"


def _ask(runner, argv: list[str], what: str, target: Target | None = None, line: int = 0) -> str:
    """One line of a short command's output; DumpError with its message when it fails."""
    if target is not None:
        out = target.query(argv, what)
    else:
        result = runner.run(argv, {}, 120)
        if result.code != 0:
            raise DumpError(f"{what} in {runner.where} failed (exit {result.code}): "
                            f"{result.stderr[-400:] or 'no message'}")
        out = result.stdout
    lines = out.splitlines()
    return lines[line].strip() if len(lines) > line else ""
