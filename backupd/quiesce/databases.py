"""Logical database dumps and their restore, for every database kind.

The kind modules (postgres.py, mysql.py, redis.py, sqlite.py) only build argv
lists; this module decides where they run (docker exec in the database's own
container, so the dump tool always matches the server; locally for `host:`
entries; in a helper that mounts the file's volume for SQLite), finds
the password, streams the dump through the normal artifact path, and turns a
failing tool's stderr into a one-line error with the password redacted.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable, Iterator

from backupd.config import DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.errors import BackupdError, NameClashError, NotFoundError, UnsafeNameError
from backupd.names import decode_name, encode_name, unquotable
from backupd.quiesce import mysql, postgres, redis, sqlite
from backupd.quiesce.runner import KILLED_BY_TIMEOUT, MISSING_COMMAND, ContainerRunner, LocalRunner, Runner
from backupd.redaction import redact, remember

log = logging.getLogger(__name__)

KINDS: dict[str, ModuleType] = {"postgres": postgres, "mysql": mysql, "sqlite": sqlite, "redis": redis}
# Kinds dumped whole, one artifact per entry: no databases to list or choose.
WHOLE = ("sqlite", "redis")
ERROR_WORD = re.compile(r"\b(error|fatal)\b", re.IGNORECASE)


def reports_error(stderr: str) -> bool:
    """A tool that exits 0 but prints an error line still failed (warnings are fine)."""
    return any(ERROR_WORD.search(line) and "warning" not in line.lower() for line in stderr.splitlines())
QUERY_TIMEOUT = 60.0
QUERY_OUTPUT_MAX = 64 << 20  # a listing is never cut short: more than this fails instead


class DumpError(BackupdError):
    """A dump or restore tool failed; the message carries its own stderr, redacted."""


@dataclass(frozen=True)
class Target:
    """A database server and how to reach it."""

    spec: DatabaseSpec
    kind: ModuleType
    runner: Runner
    env: dict[str, str] = field(repr=False)  # PGPASSWORD / MYSQL_PWD
    password: str | None = field(repr=False)
    tools: dict[str, str] = field(default_factory=dict)

    def redact(self, text: str) -> str:
        return redact(text)

    def query(self, argv: list[str], what: str) -> str:
        result = self.runner.run(argv, self.env, QUERY_TIMEOUT, keep=QUERY_OUTPUT_MAX)
        if result.code != 0:
            raise DumpError(f"{what} in {self.runner.where} failed (exit {result.code}): "
                            f"{self.redact(result.stderr)[-400:] or 'no message'}")
        if result.truncated:
            raise DumpError(f"{what} in {self.runner.where}: more than {QUERY_OUTPUT_MAX >> 20} MiB of output")
        return result.stdout

    def databases(self, where: str) -> list[str]:
        """Every database on the server, by its exact name (the tools print them hex-encoded)."""
        out = self.query(self.kind.list_databases(self.spec, self.tools), "listing databases")
        names = []
        for line in out.split():
            try:
                names.append(bytes.fromhex(line).decode("utf-8"))
            except ValueError:  # UnicodeDecodeError is one
                raise UnsafeNameError(f"{where}: {self.runner.where} lists a database whose name is not "
                                      f"UTF-8 (hex {line[:140]}); backupd cannot name it to a tool") from None
        return names


@dataclass(frozen=True)
class Dump:
    """One artifact: a dump command, ready to stream."""

    artifact: str
    source: str  # kind:server/database (database '*all' or '*globals'), read back by restore
    argv: list[str]
    target: Target

    @contextmanager
    def open(self) -> Iterator[Iterator[bytes]]:
        """Stream the dump; the entry's `timeout:` kills the tool (and fails the dump) when it runs over."""
        timeout = self.target.spec.timeout
        deadline = self.target.runner.deadline(timeout.total_seconds()) if timeout else []
        with self.target.runner.stream(deadline + self.argv, self.target.env) as proc:
            yield _checked(proc, self.argv[0], self.target, timeout.total_seconds() if deadline and timeout else None)


def _checked(proc, tool: str, target: Target, timeout: float | None = None) -> Iterator[bytes]:
    yield from proc.stdout()
    code = proc.exit_code()
    stderr = target.redact(proc.stderr_text())
    if timeout is not None and code in KILLED_BY_TIMEOUT:
        raise DumpError(f"{tool} in {target.runner.where} timed out after {timeout:g}s (its entry's "
                        f"timeout:) and was killed")
    if code != 0 or reports_error(stderr):
        raise DumpError(f"{tool} in {target.runner.where} failed (exit {code}): {stderr[-500:] or 'no message'}")
    progress = getattr(target.kind, "PROGRESS", None)
    if progress is not None:  # a tool's own progress lines are no warning
        stderr = "\n".join(line for line in stderr.splitlines() if not progress.match(line.strip())).strip()
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
        runner: Runner = kind.runner(host, c, spec, where) if hasattr(kind, "runner") \
            else ContainerRunner(host, container)
        if password is None:
            env = host.container_env(container)
            password = next((env[v] for v in kind.PASSWORD_VARS if env.get(v)), None)
    else:
        runner = LocalRunner()
    remember(password)  # from the config or the container's own environment: never in a message
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


def check_name(name: str, at: str) -> str:
    """`name` if every tool can be handed it as a plain value; else UnsafeNameError naming `at`."""
    reason = unquotable(name)
    if reason is not None:
        raise UnsafeNameError(f"{at}: database {name!r} cannot be passed to a dump tool safely: {reason}")
    return name


@dataclass(frozen=True)
class Source:
    """What a dump holds: one `database` of `server`, or (database None) a `marker` dump of no
    one database: 'all' (MySQL --all-databases) or 'globals' (PostgreSQL roles)."""

    kind: str
    server: str
    database: str | None
    marker: str | None = None


def make_source(kind: str, server: str, database: str) -> str:
    """'postgres:pg/app'; the database part encoded, so it never holds '/' nor starts with '*'."""
    return f"{kind}:{server}/{encode_name(database)}"


def marker_source(kind: str, server: str, what: str) -> str:
    """'postgres:pg/*globals': a dump of no one database (`all`, or the roles of `all`)."""
    return f"{kind}:{server}/*{what}"


MARKER_SEP = ":"  # between an entry's name and a dump of no one database (the roles)


def database_artifact(entry: str, database: str) -> str:
    """'pg.app': one database of an entry that dumps several."""
    return f"{entry}.{database}"


def marker_artifact(entry: str, what: str) -> str:
    """'pg:globals': no entry name holds ':' (config.NAME_RE), so no database of the entry,
    whatever a tenant calls it, is stored under this name. (Backups before this change named
    the roles dump 'pg.globals'; restore goes by the artifact's source, so they still restore.)"""
    return f"{entry}{MARKER_SEP}{what}"


def made_by(artifact: str, entry: str) -> bool:
    """Whether dump `artifact` came from the `databases:` entry named `entry`."""
    return artifact == entry or artifact.startswith((entry + ".", entry + MARKER_SEP))


def entry_of(artifact: str) -> str:
    """A best guess at the entry an artifact came from, when no configured entry made it
    (an entry name may itself hold '.')."""
    return re.split(f"[.{re.escape(MARKER_SEP)}]", artifact, maxsplit=1)[0]


def parse_source(source: str) -> Source:
    """'postgres:pg/a%2Fb' -> Source('postgres', 'pg', 'a/b'); 'mysql:db/*all' -> marker 'all'."""
    kind, _, rest = source.partition(":")
    server, _, database = rest.rpartition("/")
    if kind not in KINDS or not server or not database:
        raise BackupdError(f"artifact source '{source}' is not a database dump")
    if database.startswith("*"):
        return Source(kind, server, None, database[1:])
    try:
        return Source(kind, server, decode_name(database))
    except UnicodeDecodeError:
        raise BackupdError(f"artifact source '{source}' does not name a database") from None


def plan_dumps(spec: DatabaseSpec, host: DockerHost, where: str) -> list[Dump]:
    """The dumps one `databases:` entry makes, resolved now (unknown or unsafe names fail here)."""
    if spec.kind in WHOLE:
        target = connect(spec, host, where)
        server = server_name(spec)
        # SQLite: the file's path is the 'database' restore reads back; Redis: the whole server.
        source = make_source(spec.kind, server, spec.path) if spec.path else marker_source(spec.kind, server, "all")
        return [Dump(spec.name, source, target.kind.dump_everything(spec, target.tools), target)]
    if spec.database == "all":
        wanted = None
    elif isinstance(spec.database, str):  # (artifact, database, config key path)
        wanted = [(spec.name, spec.database, where)]
    else:
        wanted = [(database_artifact(spec.name, n), n, f"{where}.database[{i}]")
                  for i, n in enumerate(spec.database)]
    for _, name, at in wanted or []:
        check_name(name, at)
    target = connect(spec, host, where)
    kind, tools = target.kind, target.tools
    server = server_name(spec)

    def dump(artifact: str, database: str) -> Dump:
        return Dump(artifact, make_source(kind.KIND, server, database), kind.dump_one(spec, database, tools),
                    target)

    if wanted is None:
        everything = kind.dump_everything(spec, tools)
        if everything is not None:
            return [Dump(spec.name, marker_source(kind.KIND, server, "all"), everything, target)]
        dumps = [dump(database_artifact(spec.name, n), check_name(n, f"{where}.database (all)"))
                 for n in target.databases(where) if n not in kind.SYSTEM_DATABASES]
        extra = kind.dump_all_extra(spec, tools)
        if extra is not None:
            dumps.append(Dump(marker_artifact(spec.name, extra[0]), marker_source(kind.KIND, server, extra[0]),
                              extra[1], target))
        return dumps
    existing = set(target.databases(where))
    for _, name, at in wanted:
        if name not in existing:
            raise NotFoundError(f"{at}: database {name!r} does not exist on {server}")
    return [dump(artifact, name) for artifact, name, _ in wanted]


def check_unique(dumps: list[Dump], where: str) -> None:
    """Two dumps of one job under one name would share an object key: one would overwrite the other."""
    seen: dict[str, Dump] = {}
    for d in dumps:
        if d.artifact in seen:
            raise NameClashError(
                f"{where}: two dumps would both be stored as '{d.artifact}' ({seen[d.artifact].source} "
                f"and {d.source}); rename an entry (name:) or list its databases explicitly")
        seen[d.artifact] = d


def restore_dump(target: Target, source: Source, chunks: Iterable[bytes], force: bool, where: str) -> None:
    """Feed a dump into the target server; refuse a non-empty database without force.
    `where` names the restore in errors (`restore pg.app`)."""
    kind, spec, tools = target.kind, target.spec, target.tools
    database = source.database
    if database is None:
        if source.marker == "all" and not force:
            names = [check_name(n, where) for n in target.databases(where) if n not in kind.SYSTEM_DATABASES]
            busy = [n for n in names if _object_count(target, n) > 0]
            if busy:
                raise _refused(target, ", ".join(repr(n) for n in busy))
        argv = kind.restore(spec, None, tools)
    else:
        check_name(database, where)
        existing = set(target.databases(where))
        if database in existing:
            if _object_count(target, database) > 0 and not force:
                raise _refused(target, repr(database))
        else:
            create = kind.create_database(spec, database, tools)
            if create is not None:
                target.query(create, f"creating database {database!r}")
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
                       f"inspecting database {database!r}")
    return int(out.strip() or 0)


def _refused(target: Target, what: str) -> BackupdError:
    from backupd.errors import RefusedError

    return RefusedError(f"database {what} on {target.runner.where} is not empty; pass --force to "
                        "overwrite it (objects in the dump are dropped and recreated)")
