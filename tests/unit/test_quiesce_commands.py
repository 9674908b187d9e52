"""Dump and restore commands are argv lists with no secret in them, and every name in them is only
read as a name; stop order follows Compose."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg2.extensions import parse_dsn

from backupd.config import DatabaseSpec
from backupd.errors import UnsafeNameError
from backupd.quiesce import mysql, postgres
from backupd.quiesce.databases import Source, make_source, marker_source, parse_source, reports_error
from backupd.quiesce.runner import LocalRunner
from backupd.quiesce.stop import stop_order

SECRET = "s3cr3t-pa55"
HOSTILE = ["host=127.0.0.1 port=5432", "host=172.17.0.1", "postgresql://attacker:5432/x", "service=evil",
           "two words", "a/b", "it's", "back\\slash", "'", "-x", "--help", "-h10.0.0.9", "*all", "zażółć 日本語",
           "new\nline", "a`b", "a=b"]


def spec(**kw) -> DatabaseSpec:
    base = {"name": "db", "type": "postgres", "container": "pg", "password": SECRET}
    return DatabaseSpec(**{**base, **kw})


def test_pg_dump_is_custom_format_with_user_and_no_password():
    argv = postgres.dump_one(spec(options=["--no-comments"]), "app", {})
    assert argv == ["pg_dump", "--dbname=dbname='app' user='postgres'", "--format=custom", "--no-comments"]
    assert SECRET not in " ".join(argv)
    assert postgres.password_env(SECRET) == {"PGPASSWORD": SECRET}


def test_pg_network_mode_names_host_and_port_inside_the_conninfo():
    argv = postgres.dump_one(spec(container=None, host="10.0.0.5", port=6543), "app", {})
    assert parse_dsn(argv[1].removeprefix("--dbname=")) == {
        "dbname": "app", "user": "postgres", "host": "10.0.0.5", "port": "6543"}


def test_pg_all_adds_globals_and_restore_cleans():
    assert postgres.dump_all_extra(spec(), {})[1][0] == "pg_dumpall"
    assert "--globals-only" in postgres.dump_all_extra(spec(), {})[1]
    restore = postgres.restore(spec(), "app", {})
    assert restore[0] == "pg_restore" and {"--clean", "--if-exists"} <= set(restore)


def _pg_commands(s: DatabaseSpec, name: str) -> list[list[str]]:
    """Every command that names a database, as backup and restore build them."""
    return [postgres.dump_one(s, name, {}), postgres.restore(s, name, {}),
            postgres.count_objects(s, name, {}), postgres.create_database(s, name, {})]


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("network", [False, True])
def test_pg_database_names_reach_libpq_only_as_the_dbname_value(name, network):
    """libpq itself (through psycopg2) reads the conninfo: no name adds a host, port or anything."""
    s = spec(container=None, host="db.internal", port=5432) if network else spec()
    for argv in _pg_commands(s, name):
        if argv[0] == "createdb":  # the new name is createdb's operand, after `--`
            assert argv[-2:] == ["--", name]
            conninfo = argv[1].removeprefix("--maintenance-db=")
            expected_db = "postgres"
        else:
            assert name not in argv  # never an argument of its own (`-x` would be an option)
            conninfo = argv[1].removeprefix("--dbname=")
            expected_db = name
        expected = {"dbname": expected_db, "user": "postgres"}
        if network:
            expected |= {"host": "db.internal", "port": "5432"}
        assert parse_dsn(conninfo) == expected


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1))
def test_pg_conninfo_round_trips_any_name_and_user_through_libpq(name, user):
    assert parse_dsn(postgres.conninfo(spec(user=user), name)) == {"dbname": name, "user": user}


def test_pg_user_and_host_are_quoted_values_too():
    s = spec(container=None, host="h' host='evil", user="u' dbname='x")
    assert parse_dsn(postgres.conninfo(s, "app")) == {
        "dbname": "app", "user": "u' dbname='x", "host": "h' host='evil", "port": "5432"}


def test_pg_refuses_a_name_with_nul():
    with pytest.raises(UnsafeNameError, match="NUL"):
        postgres.dump_one(spec(), "a\0b", {})


def test_pg_listing_prints_hex_so_no_name_is_split():
    sql = postgres.list_databases(spec(), {})[-1]
    assert "encode(convert_to(datname, 'UTF8'), 'hex')" in sql


def test_mysqldump_flags_and_tool_names_as_data():
    tools = {"dump": "mariadb-dump", "client": "mariadb"}
    argv = mysql.dump_one(spec(type="mariadb"), "shop", tools)
    assert argv[0] == "mariadb-dump"
    assert {"--single-transaction", "--routines", "--triggers", "--events"} <= set(argv)
    assert argv[-3:] == ["--databases", "--", "shop"]
    assert SECRET not in " ".join(argv)
    assert mysql.password_env(SECRET) == {"MYSQL_PWD": SECRET}
    assert "--all-databases" in mysql.dump_everything(spec(type="mysql"), tools)


@pytest.mark.parametrize("name", HOSTILE)
def test_mysql_database_names_come_after_the_end_of_options(name):
    tools = {"dump": "mysqldump", "client": "mysql"}
    argv = mysql.dump_one(spec(type="mysql", options=["--skip-lock-tables"]), name, tools)
    assert argv[-3:] == ["--databases", "--", name] and argv.count(name) == 1
    assert argv.index("--skip-lock-tables") < argv.index("--")


def test_mysql_connection_values_are_single_option_arguments():
    s = spec(type="mysql", container=None, host="-hevil", port=3307, user="--host=evil")
    assert mysql.conn(s) == ["--user=--host=evil", "--host=-hevil", "--port=3307", "--protocol=TCP"]
    assert mysql.conn(spec(type="mysql")) == ["--user=root"]


@pytest.mark.parametrize("name", ["x'; DROP DATABASE y; --", "a`b", "back\\slash", "it's", "zażółć"])
def test_mysql_sql_carries_names_as_hex_literals(name):
    sql = mysql.count_objects(spec(type="mysql"), name, {"client": "mysql"})[-1]
    assert sql.endswith(f"table_schema = X'{name.encode().hex()}'")
    assert name not in sql


def test_mysql_refuses_a_name_with_nul():
    with pytest.raises(UnsafeNameError, match="NUL"):
        mysql.dump_one(spec(type="mysql"), "a\0b", {"dump": "mysqldump"})
    with pytest.raises(UnsafeNameError, match="NUL"):
        mysql.count_objects(spec(type="mysql"), "a\0b", {"client": "mysql"})


def test_mysql_listing_prints_hex_so_tabs_and_newlines_survive():
    assert "HEX(SCHEMA_NAME)" in mysql.list_databases(spec(type="mysql"), {"client": "mysql"})[-1]


def test_mariadb_is_an_alias_of_mysql():
    assert spec(type="mariadb").kind == "mysql" and spec(type="postgresql").kind == "postgres"


def test_source_round_trip():
    assert parse_source("postgres:pg/app") == Source("postgres", "pg", "app")
    assert parse_source("mysql:10.0.0.5:3306/*all") == Source("mysql", "10.0.0.5:3306", None, "all")


@pytest.mark.parametrize("name", HOSTILE)
def test_source_round_trips_any_database_name(name):
    source = make_source("postgres", "pg", name)
    assert parse_source(source) == Source("postgres", "pg", name)
    assert source.count("/") == 1


def test_a_database_named_like_a_marker_is_not_the_marker():
    for what in ("all", "globals"):
        assert parse_source(marker_source("postgres", "pg", what)) == Source("postgres", "pg", None, what)
        assert parse_source(make_source("postgres", "pg", f"*{what}")) == Source("postgres", "pg", f"*{what}")
    assert parse_source(make_source("postgres", "pg", "%2Aglobals")) == Source("postgres", "pg", "%2Aglobals")


def test_sources_of_a_server_given_as_a_socket_path_still_parse():
    assert parse_source(make_source("postgres", "/run/postgresql:", "a/b")) == Source("postgres", "/run/postgresql:", "a/b")


def test_error_lines_are_recognised_but_warnings_are_not():
    assert reports_error('pg_dump: error: connection to server failed: FATAL:  password authentication failed')
    assert reports_error("mysqldump: Got error: 1045: Access denied")
    assert not reports_error("mysqldump: [Warning] Using a password on the command line")
    assert not reports_error("pg_dump: last built-in OID is 16383")


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


def test_a_container_sharing_anothers_network_stops_first_and_starts_after_it():
    """network_mode: service:vpn (the engine says container:<id>) depends on vpn like depends_on."""
    vpn = FakeContainer("vpn")
    client = FakeContainer("z-client")  # by name alone it would stop last
    client.attrs = {"HostConfig": {"NetworkMode": f"container:{vpn.id}"}}  # type: ignore[attr-defined]
    assert [c.name for c in stop_order([vpn, client])] == ["z-client", "vpn"]
    assert [c.name for c in stop_order([client, vpn])] == ["z-client", "vpn"]
