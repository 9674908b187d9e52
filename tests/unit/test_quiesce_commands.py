"""Dump and restore commands are argv lists with no secret in them; stop order follows Compose."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from backupd.config import DatabaseSpec
from backupd.errors import ConfigError
from backupd.quiesce import mysql, postgres
from backupd.quiesce.databases import parse_source, reports_error
from backupd.quiesce.runner import LocalRunner, redact
from backupd.quiesce.stop import stop_order

SECRET = "s3cr3t-pa55"


def spec(**kw) -> DatabaseSpec:
    base = {"name": "db", "type": "postgres", "container": "pg", "password": SECRET}
    return DatabaseSpec(**{**base, **kw})


def test_pg_dump_is_custom_format_with_user_and_no_password():
    argv = postgres.dump_one(spec(options=["--no-comments"]), "app", {})
    assert argv[:3] == ["pg_dump", "-U", "postgres"] and "--format=custom" in argv
    assert argv[-3:] == ["--dbname", "app", "--no-comments"]
    assert SECRET not in " ".join(argv)
    assert postgres.password_env(SECRET) == {"PGPASSWORD": SECRET}


def test_pg_network_mode_names_host_and_port():
    argv = postgres.dump_one(spec(container=None, host="10.0.0.5", port=6543), "app", {})
    assert argv[argv.index("-h") + 1] == "10.0.0.5" and argv[argv.index("-p") + 1] == "6543"


def test_pg_all_adds_globals_and_restore_cleans():
    assert postgres.dump_all_extra(spec(), {})[1][0] == "pg_dumpall"
    assert "--globals-only" in postgres.dump_all_extra(spec(), {})[1]
    restore = postgres.restore(spec(), "app", {})
    assert restore[0] == "pg_restore" and {"--clean", "--if-exists"} <= set(restore)


def test_mysqldump_flags_and_tool_names_as_data():
    tools = {"dump": "mariadb-dump", "client": "mariadb"}
    argv = mysql.dump_one(spec(type="mariadb"), "shop", tools)
    assert argv[0] == "mariadb-dump"
    assert {"--single-transaction", "--routines", "--triggers", "--events"} <= set(argv)
    assert argv[-2:] == ["--databases", "shop"]
    assert SECRET not in " ".join(argv)
    assert mysql.password_env(SECRET) == {"MYSQL_PWD": SECRET}
    assert "--all-databases" in mysql.dump_everything(spec(type="mysql"), tools)


def test_mysql_refuses_database_names_it_would_have_to_quote():
    with pytest.raises(ConfigError, match="will not quote"):
        mysql.count_objects(spec(type="mysql"), "x'; DROP DATABASE y; --", {"client": "mysql"})


def test_mariadb_is_an_alias_of_mysql():
    assert spec(type="mariadb").kind == "mysql" and spec(type="postgresql").kind == "postgres"


def test_source_round_trip():
    assert parse_source("postgres:pg/app") == ("postgres", "pg", "app")
    assert parse_source("mysql:10.0.0.5:3306/*all") == ("mysql", "10.0.0.5:3306", "*all")


def test_error_lines_are_recognised_but_warnings_are_not():
    assert reports_error('pg_dump: error: connection to server failed: FATAL:  password authentication failed')
    assert reports_error("mysqldump: Got error: 1045: Access denied")
    assert not reports_error("mysqldump: [Warning] Using a password on the command line")
    assert not reports_error("pg_dump: last built-in OID is 16383")


def test_redact_hides_every_occurrence():
    assert redact(f"bad {SECRET} and {SECRET}", [SECRET, None]) == "bad *** and ***"


def test_local_runner_times_out_and_kills():
    result = LocalRunner().run(["sleep", "30"], {}, timeout=0.5)
    assert result.timed_out


@dataclass
class FakeContainer:
    name: str
    labels: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return "id-" + self.name


def compose(name: str, service: str, depends: str = "") -> FakeContainer:
    labels = {"com.docker.compose.project": "shop", "com.docker.compose.service": service}
    if depends:
        labels["com.docker.compose.depends_on"] = depends
    return FakeContainer(name, labels)


def test_dependents_stop_before_what_they_depend_on():
    db = compose("shop-db-1", "db")
    app = compose("shop-app-1", "app", "db:service_started:false,cache:service_started:false")
    cache = compose("shop-cache-1", "cache")
    web = compose("shop-web-1", "web", "app:service_started:false")
    order = [c.name for c in stop_order([db, cache, app, web])]
    assert order.index("shop-web-1") < order.index("shop-app-1") < order.index("shop-db-1")
    assert order.index("shop-app-1") < order.index("shop-cache-1")


def test_unrelated_containers_stop_in_name_order():
    assert [c.name for c in stop_order([FakeContainer("b"), FakeContainer("a")])] == ["a", "b"]
