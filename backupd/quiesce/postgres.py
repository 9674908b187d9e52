"""PostgreSQL: pg_dump custom format per database, pg_dumpall --globals-only for roles.

Every function returns argv lists (no shell); the password travels as
PGPASSWORD in the environment. Where to connect travels as one conninfo
string that backupd builds itself, every value quoted, in `--dbname=`: a
database name is never read by libpq as a URI or a keyword list (a database
named `host=10.0.0.9` must not send the password there), nor by the tool as
an option.
"""

from __future__ import annotations

from backupd.config import DatabaseSpec
from backupd.errors import UnsafeNameError

KIND = "postgres"
DEFAULT_USER = "postgres"
PASSWORD_VARS = ("POSTGRES_PASSWORD",)
SYSTEM_DATABASES: frozenset[str] = frozenset()
FORMAT = "pg_dump custom"
MAINTENANCE_DB = "postgres"


def password_env(password: str | None) -> dict[str, str]:
    return {"PGPASSWORD": password} if password else {}


def quote_conninfo_value(value: str) -> str:
    """A conninfo value in single quotes, with backslash and quote escaped (libpq's rules)."""
    if "\0" in value:
        raise UnsafeNameError(f"{value!r} contains a NUL byte, which no PostgreSQL tool can be given")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(spec: DatabaseSpec, database: str) -> str:
    """`dbname='…' user='…' [host='…' port='…']`: libpq reads each value as a plain value."""
    pairs = [("dbname", database), ("user", spec.user or DEFAULT_USER)]
    if spec.host:
        pairs += [("host", spec.host), ("port", str(spec.port or 5432))]
    return " ".join(f"{key}={quote_conninfo_value(value)}" for key, value in pairs)


def conn(spec: DatabaseSpec, database: str) -> str:
    return "--dbname=" + conninfo(spec, database)


def list_databases(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    """One hex-encoded UTF-8 name per line: no name can be split or merged by the output format."""
    return ["psql", conn(spec, MAINTENANCE_DB), "-AtX", "-c",
            "SELECT encode(convert_to(datname, 'UTF8'), 'hex') FROM pg_database "
            "WHERE datallowconn AND NOT datistemplate ORDER BY datname"]


def dump_one(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return ["pg_dump", conn(spec, database), "--format=custom", *spec.options]


def dump_all_extra(spec: DatabaseSpec, tools: dict[str, str]) -> tuple[str, list[str]] | None:
    """With `database: all`, roles and tablespaces live outside any database."""
    return "globals", ["pg_dumpall", conn(spec, MAINTENANCE_DB), "--globals-only"]


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str] | None:
    return None  # PostgreSQL dumps `all` database by database


def restore(spec: DatabaseSpec, database: str | None, tools: dict[str, str]) -> list[str]:
    if database is None:  # the globals dump is plain SQL; existing roles only warn
        return ["psql", conn(spec, MAINTENANCE_DB), "-X", "-q"]
    return ["pg_restore", conn(spec, database), "--clean", "--if-exists", "--exit-on-error"]


def create_database(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str] | None:
    # createdb quotes the new name as an identifier itself; `--` keeps a leading '-' a name.
    return ["createdb", "--maintenance-db=" + conninfo(spec, MAINTENANCE_DB), "--", database]


def count_objects(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return ["psql", conn(spec, database), "-AtX", "-c",
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r','v','m','S','f','p') AND n.nspname <> 'information_schema' "
            "AND n.nspname NOT LIKE 'pg\\_%'"]


TOOL_CANDIDATES: dict[str, tuple[str, ...]] = {}
