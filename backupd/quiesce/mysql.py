"""MySQL and MariaDB: mysqldump --single-transaction with routines, triggers and events.

MariaDB is MySQL here with the differences as data: the tools' names
(mariadb-dump / mariadb on newer MariaDB, mysqldump / mysql elsewhere) are
probed in order. The password travels as MYSQL_PWD in the environment.
"""

from __future__ import annotations

import re

from backupd.config import DatabaseSpec
from backupd.errors import ConfigError

KIND = "mysql"
DEFAULT_USER = "root"
PASSWORD_VARS = ("MARIADB_ROOT_PASSWORD", "MYSQL_ROOT_PASSWORD")
SYSTEM_DATABASES = frozenset({"information_schema", "performance_schema", "sys", "mysql"})
TOOL_CANDIDATES = {"dump": ("mysqldump", "mariadb-dump"), "client": ("mysql", "mariadb")}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_$.-]+$")


def password_env(password: str | None) -> dict[str, str]:
    return {"MYSQL_PWD": password} if password else {}


def conn(spec: DatabaseSpec) -> list[str]:
    args = ["--user", spec.user or DEFAULT_USER]
    if spec.host:
        args += ["--host", spec.host, "--port", str(spec.port or 3306), "--protocol=TCP"]
    return args


def _safe(database: str) -> str:
    if not SAFE_NAME.match(database):
        raise ConfigError(f"database name '{database}' has characters backupd will not quote into SQL")
    return database


def list_databases(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    return [tools["client"], *conn(spec), "--batch", "--skip-column-names", "--execute", "SHOW DATABASES"]


def dump_one(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return [tools["dump"], *conn(spec), "--single-transaction", "--routines", "--triggers", "--events",
            "--hex-blob", "--default-character-set=utf8mb4", *spec.options, "--databases", _safe(database)]


def dump_all_extra(spec: DatabaseSpec, tools: dict[str, str]) -> tuple[str, list[str]] | None:
    return None


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str] | None:
    """`database: all` is one --all-databases dump: it carries users and grants too."""
    return [tools["dump"], *conn(spec), "--single-transaction", "--routines", "--triggers", "--events",
            "--hex-blob", "--default-character-set=utf8mb4", *spec.options, "--all-databases"]


def restore(spec: DatabaseSpec, database: str | None, tools: dict[str, str]) -> list[str]:
    # The dump names its databases (CREATE DATABASE / USE), so no --database here.
    return [tools["client"], *conn(spec), "--default-character-set=utf8mb4"]


def create_database(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str] | None:
    return None  # the dump creates it


def count_objects(spec: DatabaseSpec, database: str, tools: dict[str, str]) -> list[str]:
    return [tools["client"], *conn(spec), "--batch", "--skip-column-names", "--execute",
            f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{_safe(database)}'"]
