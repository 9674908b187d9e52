"""Logical database dumps and their restore, for every database kind.

The kind modules (postgres.py, mysql.py) only build argv lists; this module
decides where they run (docker exec in the database's own container, so the
dump tool always matches the server; or locally for `host:` entries), finds
the password, streams the dump through the normal artifact path, and turns a
failing tool's stderr into a one-line error with the password redacted.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable, Iterator

from backupd.config import DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.errors import BackupdError, ConfigError, NotFoundError
from backupd.quiesce import mysql, postgres
from backupd.quiesce.runner import MISSING_COMMAND, ContainerRunner, LocalRunner, Runner, redact

log = logging.getLogger(__name__)

KINDS: dict[str, ModuleType] = {"postgres": postgres, "mysql": mysql}
ERROR_WORD = re.compile(r"\b(error|fatal)\b", re.IGNORECASE)


def reports_error(stderr: str) -> bool:
    """A tool that exits 0 but prints an error line still failed (warnings are fine)."""
    return any(ERROR_WORD.search(line) and "warning" not in line.lower() for line in stderr.splitlines())
QUERY_TIMEOUT = 60.0


class DumpError(BackupdError):
    """A dump or restore tool failed; the message carries its own stderr, redacted."""


@dataclass(frozen=True)
class Target:
    """A database server and how to reach it."""

    spec: DatabaseSpec
    kind: ModuleType
    runner: Runner
    env: dict[str, str]
    password: str | None
    tools: dict[str, str]

    def redact(self, text: str) -> str:
        return redact(text, [self.password])

    def query(self, argv: list[str], what: str) -> str:
        result = self.runner.run(argv, self.env, QUERY_TIMEOUT)
        if result.code != 0:
            raise DumpError(f"{what} in {self.runner.where} failed (exit {result.code}): "
                            f"{self.redact(result.stderr)[-400:] or 'no message'}")
        return result.stdout


@dataclass(frozen=True)
class Dump:
    """One artifact: a dump command, ready to stream."""

    artifact: str
    source: str  # kind:server/database (database '*all' or '*globals'), read back by restore
    argv: list[str]
    target: Target

    @contextmanager
    def open(self) -> Iterator[Iterator[bytes]]:
        with self.target.runner.stream(self.argv, self.target.env) as proc:
            yield _checked(proc, self.argv[0], self.target)


def _checked(proc, tool: str, target: Target) -> Iterator[bytes]:
    yield from proc.stdout()
    code = proc.exit_code()
    stderr = target.redact(proc.stderr_text())
    if code != 0 or reports_error(stderr):
        raise DumpError(f"{tool} in {target.runner.where} failed (exit {code}): {stderr[-500:] or 'no message'}")
    if stderr:
        log.warning("%s said: %s", tool, stderr[-500:])


def connect(spec: DatabaseSpec, host: DockerHost, where: str, container: str | None = None) -> Target:
    """Resolve where the tool runs and the password; fail before anything runs."""
    kind = KINDS[spec.kind]
    container = container or spec.container
    password = spec.password.get_secret_value() if spec.password else None
    if container is not None:
        c = host.container(container, where)
        if c.status != "running":
            raise BackupdError(f"{where}: container '{container}' is {c.status}, not running")
        runner: Runner = ContainerRunner(host, container)
        if password is None:
            env = host.container_env(container)
            password = next((env[v] for v in kind.PASSWORD_VARS if env.get(v)), None)
    else:
        runner = LocalRunner()
    tools = _probe_tools(kind, runner, where)
    return Target(spec, kind, runner, kind.password_env(password), password, tools)


def _probe_tools(kind: ModuleType, runner: Runner, where: str) -> dict[str, str]:
    """First installed name of each tool (mysqldump vs mariadb-dump and so on)."""
    tools = {}
    for role, names in kind.TOOL_CANDIDATES.items():
        for name in names:
            try:
                if runner.run([name, "--version"], {}, QUERY_TIMEOUT).code not in MISSING_COMMAND:
                    tools[role] = name
                    break
            except BackupdError:
                continue
        else:
            raise NotFoundError(f"{where}: none of {', '.join(names)} is installed in {runner.where}")
    return tools


def server_name(spec: DatabaseSpec, container: str | None = None) -> str:
    return container or spec.container or f"{spec.host}:{spec.port or ''}"


def plan_dumps(spec: DatabaseSpec, host: DockerHost, where: str) -> list[Dump]:
    """The dumps one `databases:` entry makes, resolved now (unknown names fail here)."""
    target = connect(spec, host, where)
    kind, tools = target.kind, target.tools
    server = server_name(spec)
    source = lambda db: f"{kind.KIND}:{server}/{db}"  # noqa: E731
    if spec.database == "all":
        everything = kind.dump_everything(spec, tools)
        if everything is not None:
            return [Dump(spec.name, source("*all"), everything, target)]
        names = [n for n in target.query(kind.list_databases(spec, tools), "listing databases").split()
                 if n not in kind.SYSTEM_DATABASES]
        dumps = [Dump(f"{spec.name}.{n}", source(n), kind.dump_one(spec, n, tools), target) for n in names]
        extra = kind.dump_all_extra(spec, tools)
        if extra is not None:
            dumps.append(Dump(f"{spec.name}.{extra[0]}", source(f"*{extra[0]}"), extra[1], target))
        return dumps
    wanted = [spec.database] if isinstance(spec.database, str) else list(spec.database)
    existing = set(target.query(kind.list_databases(spec, tools), "listing databases").split())
    for i, name in enumerate(wanted):
        if name not in existing:
            at = where if isinstance(spec.database, str) else f"{where}.database[{i}]"
            raise NotFoundError(f"{at}: database '{name}' does not exist on {server}")
    if isinstance(spec.database, str):
        return [Dump(spec.name, source(spec.database), kind.dump_one(spec, spec.database, tools), target)]
    return [Dump(f"{spec.name}.{n}", source(n), kind.dump_one(spec, n, tools), target) for n in wanted]


def parse_source(source: str) -> tuple[str, str, str]:
    """'postgres:pg/app' -> ('postgres', 'pg', 'app')."""
    kind, _, rest = source.partition(":")
    server, _, database = rest.rpartition("/")
    if kind not in KINDS or not server:
        raise BackupdError(f"artifact source '{source}' is not a database dump")
    return kind, server, database


def restore_dump(target: Target, database: str, chunks: Iterable[bytes], force: bool) -> None:
    """Feed a dump into the target server; refuse a non-empty database without force."""
    kind, spec, tools = target.kind, target.spec, target.tools
    if database.startswith("*"):
        if database == "*all" and not force:
            names = [n for n in target.query(kind.list_databases(spec, tools), "listing databases").split()
                     if n not in kind.SYSTEM_DATABASES]
            busy = [n for n in names if _object_count(target, n) > 0]
            if busy:
                raise _refused(target, ", ".join(busy))
        argv = kind.restore(spec, None, tools)
    else:
        existing = set(target.query(kind.list_databases(spec, tools), "listing databases").split())
        if database in existing:
            if _object_count(target, database) > 0 and not force:
                raise _refused(target, database)
        else:
            create = kind.create_database(spec, database, tools)
            if create is not None:
                target.query(create, f"creating database '{database}'")
        argv = kind.restore(spec, database, tools)
    with target.runner.stream(argv, target.env, stdin=chunks) as proc:
        output = b"".join(proc.stdout())
        code = proc.exit_code()
        feed_error = getattr(proc, "feed_error", None)
        if feed_error is not None:
            raise feed_error
        stderr = target.redact(proc.stderr_text())
        if code != 0:
            raise DumpError(f"{argv[0]} in {target.runner.where} failed (exit {code}): "
                            f"{stderr[-500:] or target.redact(output.decode('utf-8', 'replace'))[-500:]}")


def _object_count(target: Target, database: str) -> int:
    out = target.query(target.kind.count_objects(target.spec, database, target.tools),
                       f"inspecting database '{database}'")
    return int(out.strip() or 0)


def _refused(target: Target, what: str) -> BackupdError:
    from backupd.errors import RefusedError

    return RefusedError(f"database {what} on {target.runner.where} is not empty; pass --force to "
                        "overwrite it (objects in the dump are dropped and recreated)")
