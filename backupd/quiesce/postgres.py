"""PostgreSQL: pg_dump custom format per database, pg_dumpall --globals-only for roles.

Every function returns argv lists (no shell); the password travels as
PGPASSWORD in the environment.
"""

from __future__ import annotations

from backupd.config import DatabaseSpec

KIND = "postgres"
DEFAULT_USER = "postgres"
PASSWORD_VARS = ("POSTGRES_PASSWORD",)
SYSTEM_DATABASES: frozenset[str] = frozenset()
FORMAT = "pg_dump custom"


def password_env(password: str | None) -> dict[str, str]:
    return {"PGPASSWORD": password} if password else {}


def conn(spec: DatabaseSpec) -> list[str]:
    args = ["-U", spec.user or DEFAULT_USER]
    if spec.host:
        args += ["-h", spec.host, "-p", str(spec.port or 5432)]
    return args


def list_databases(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    return ["psql", *conn(spec), "-d", "postgres", "-AtX", "-c",
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"]


def dump_one(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return ["pg_dump", *conn(spec), "--format=custom", "--dbname", database, *spec.options]


def dump_all_extra(spec: DatabaseSpec, tools: dict[str, str]) -> tuple[str, list[str]] | None:
    """With `database: all`, roles and tablespaces live outside any database."""
    return "globals", ["pg_dumpall", *conn(spec), "--globals-only"]


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str] | None:
    return None  # PostgreSQL dumps `all` database by database


def restore(spec: DatabaseSpec, database: str | None, tools: dict[str, str]) -> list[str]:
    if database is None:  # the globals dump is plain SQL; existing roles only warn
        return ["psql", *conn(spec), "-d", "postgres", "-X", "-q"]
    return ["pg_restore", *conn(spec), "--clean", "--if-exists", "--exit-on-error", "--dbname", database]


def create_database(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str] | None:
    return ["createdb", *conn(spec), database]


def count_objects(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return ["psql", *conn(spec), "-d", database, "-AtX", "-c",
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r','v','m','S','f','p') AND n.nspname <> 'information_schema' "
            "AND n.nspname NOT LIKE 'pg\\_%'"]


TOOL_CANDIDATES: dict[str, tuple[str, ...]] = {}
