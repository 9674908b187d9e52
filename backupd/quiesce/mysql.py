"""MySQL and MariaDB: mysqldump --single-transaction with routines, triggers and events.

MariaDB is MySQL here with the differences as data: the tools' names
(mariadb-dump / mariadb on newer MariaDB, mysqldump / mysql elsewhere) are
probed in order. The password travels as MYSQL_PWD in the environment.

Names never reach a tool where it could read them as something else: user,
host and port go as `--option=value` (one argv element), database names
after `--` (so `-hsomewhere` stays a name), and inside SQL only as hex
literals, which need no quoting at all. mysqldump quotes the names it
writes into the dump itself (backticks doubled).
"""

from __future__ import annotations

from backupd.config import DatabaseSpec
from backupd.errors import UnsafeNameError

KIND = "mysql"
DEFAULT_USER = "root"
PASSWORD_VARS = ("MARIADB_ROOT_PASSWORD", "MYSQL_ROOT_PASSWORD")
SYSTEM_DATABASES = frozenset({"information_schema", "performance_schema", "sys", "mysql"})
TOOL_CANDIDATES = {"dump": ("mysqldump", "mariadb-dump"), "client": ("mysql", "mariadb")}
DUMP_FLAGS = ("--single-transaction", "--routines", "--triggers", "--events", "--hex-blob",
              "--default-character-set=utf8mb4")


def password_env(password: str | None) -> dict[str, str]:
    return {"MYSQL_PWD": password} if password else {}


def conn(spec: DatabaseSpec) -> list[str]:
    args = ["--user=" + (spec.user or DEFAULT_USER)]
    if spec.host:
        args += ["--host=" + spec.host, f"--port={spec.port or 3306}", "--protocol=TCP"]
    return args


def hex_literal(value: str) -> str:
    """X'…': the UTF-8 bytes of a name in SQL, compared byte for byte, with nothing to escape."""
    if "\0" in value:
        raise UnsafeNameError(f"{value!r} contains a NUL byte, which MySQL names cannot hold")
    return "X'" + value.encode("utf-8").hex() + "'"


def list_databases(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    """One hex-encoded UTF-8 name per line (--batch would escape tabs and newlines otherwise)."""
    return [tools["client"], *conn(spec), "--batch", "--skip-column-names", "--execute",
            "SELECT HEX(SCHEMA_NAME) FROM information_schema.SCHEMATA ORDER BY SCHEMA_NAME"]


def dump_one(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    hex_literal(database)  # refuses what no tool can be given
    return [tools["dump"], *conn(spec), *DUMP_FLAGS, *spec.options, "--databases", "--", database]


def dump_all_extra(spec: DatabaseSpec, tools: dict[str, str]) -> tuple[str, list[str]] | None:
    return None


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str] | None:
    """`database: all` is one --all-databases dump: it carries users and grants too."""
    return [tools["dump"], *conn(spec), *DUMP_FLAGS, *spec.options, "--all-databases"]


def restore(spec: DatabaseSpec, database: str | None, tools: dict[str, str]) -> list[str]:
    # The dump names its databases (CREATE DATABASE / USE), so no --database here.
    return [tools["client"], *conn(spec), "--default-character-set=utf8mb4"]


def create_database(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str] | None:
    return None  # the dump creates it


def count_objects(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return [tools["client"], *conn(spec), "--batch", "--skip-column-names", "--execute",
            f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {hex_literal(database)}"]
