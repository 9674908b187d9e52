"""Planning and restoring dumps against a fake server: every database is found by its exact
name, whatever it holds, and names no tool can take are refused naming where they came from."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import pytest
from psycopg2.extensions import parse_dsn

from backupd.config import DatabaseSpec
from backupd.errors import NameClashError, NotFoundError, RefusedError, UnsafeNameError
from backupd.quiesce import databases, mysql, postgres
from backupd.quiesce.databases import (DumpError, Source, Target, check_unique, parse_source, plan_dumps,
                                       restore_dump)
from backupd.quiesce.runner import LocalRunner, Result

HOSTILE = ["host=127.0.0.1 port=5432", "postgresql://attacker/x", "two words", "a/b", "it's", "-x",
           "new\nline", "tab\there", "zażółć 日本語", "*all"]


class FakeProc:
    def __init__(self, out: bytes = b"") -> None:
        self.out = out

    def stdout(self) -> Iterator[bytes]:
        yield self.out

    def exit_code(self) -> int:
        return 0

    def stderr_text(self) -> str:
        return ""


class FakeServer:
    """Answers the listing and counting queries the way psql / mysql print them."""

    where = "container 'db'"

    def __init__(self, names: list[str] | list[bytes], objects: int = 0) -> None:
        self.names = [n if isinstance(n, bytes) else n.encode() for n in names]
        self.objects = objects
        self.commands: list[list[str]] = []
        self.fed: list[bytes] = []

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stdin: Iterable[bytes] | None = None, keep: int = 16384) -> Result:
        self.commands.append(argv)
        query = argv[-1].lower()
        if "hex" in query:
            out = "".join(n.hex() + "\n" for n in self.names)
        elif "count" in query:
            out = f"{self.objects}\n"
        else:
            out = ""
        return Result(0, out[-keep:], "", False, len(out) > keep)

    @contextmanager
    def stream(self, argv: list[str], env: dict[str, str],
               stdin: Iterable[bytes] | None = None) -> Iterator[FakeProc]:
        self.commands.append(argv)
        if stdin is not None:
            self.fed.append(b"".join(stdin))
        yield FakeProc()


def pg_spec(**kw) -> DatabaseSpec:
    return DatabaseSpec(**{"name": "pg", "type": "postgres", "container": "db", **kw})


def serve(monkeypatch, spec: DatabaseSpec, server: FakeServer) -> None:
    kind = databases.KINDS[spec.kind]
    tools = {"dump": "mysqldump", "client": "mysql"} if kind is mysql else {}
    monkeypatch.setattr(databases, "connect",
                        lambda spec, host, where, container=None: Target(spec, kind, server, {}, None, tools))


def dbname(argv: list[str]) -> str:
    return parse_dsn(argv[1].removeprefix("--dbname="))["dbname"]


def test_all_dumps_every_database_by_its_exact_name(monkeypatch):
    server = FakeServer(["postgres", *HOSTILE])
    serve(monkeypatch, pg_spec(), server)
    dumps = plan_dumps(pg_spec(), None, "jobs.j.databases[0]")
    assert [d.artifact for d in dumps] == ["pg.postgres", *[f"pg.{n}" for n in HOSTILE], "pg:globals"]
    for d, name in zip(dumps, ["postgres", *HOSTILE]):
        assert d.argv[0] == "pg_dump" and dbname(d.argv) == name
        assert parse_source(d.source) == Source("postgres", "db", name)  # never a marker, even `*all`
    assert parse_source(dumps[-1].source) == Source("postgres", "db", None, "globals")


def test_explicit_names_are_checked_against_the_exact_listing(monkeypatch):
    serve(monkeypatch, pg_spec(), FakeServer(["two words", "a/b"]))
    [a, b] = plan_dumps(pg_spec(database=["two words", "a/b"]), None, "jobs.j.databases[0]")
    assert (a.artifact, dbname(a.argv)) == ("pg.two words", "two words")
    assert (b.artifact, dbname(b.argv)) == ("pg.a/b", "a/b")
    with pytest.raises(NotFoundError, match=r"jobs\.j\.databases\[0\]\.database\[1\]: database 'two' "):
        plan_dumps(pg_spec(database=["a/b", "two"]), None, "jobs.j.databases[0]")


def test_mysql_explicit_names_are_dumped_after_the_end_of_options(monkeypatch):
    spec = DatabaseSpec(name="m", type="mariadb", container="db", database=["-hevil", "a`b"])
    serve(monkeypatch, spec, FakeServer(["-hevil", "a`b", "mysql"]))
    dumps = plan_dumps(spec, None, "jobs.j.databases[0]")
    assert [d.argv[-3:] for d in dumps] == [["--databases", "--", "-hevil"], ["--databases", "--", "a`b"]]


@pytest.mark.parametrize("database,at", [
    ("a\0b", "jobs.j.databases[0]: database 'a\\x00b'"),
    (["ok", "a\0b"], "jobs.j.databases[0].database[1]: database 'a\\x00b'"),
])
def test_a_name_with_nul_is_refused_naming_the_key_path_before_connecting(monkeypatch, database, at):
    def connect(*args, **kw):
        raise AssertionError("connected before refusing the name")

    monkeypatch.setattr(databases, "connect", connect)
    with pytest.raises(UnsafeNameError) as err:
        plan_dumps(pg_spec(database=database), None, "jobs.j.databases[0]")
    assert str(err.value).startswith(at) and "NUL" in str(err.value)


def test_a_listed_name_that_is_not_utf8_is_refused_naming_the_entry(monkeypatch):
    serve(monkeypatch, pg_spec(), FakeServer([b"ok", b"caf\xe9"]))
    with pytest.raises(UnsafeNameError, match=r"^jobs\.j\.databases\[0\]: .* not UTF-8 \(hex 636166e9\)"):
        plan_dumps(pg_spec(), None, "jobs.j.databases[0]")


def test_a_restore_of_a_name_no_tool_can_take_is_refused_naming_the_restore():
    server = FakeServer(["postgres"])
    with pytest.raises(UnsafeNameError, match=r"^restore pg\.x: database 'a\\x00b' .* NUL"):
        restore_dump(Target(pg_spec(), postgres, server, {}, None, {}), Source("postgres", "db", "a\0b"),
                     [b"dump"], force=False, where="restore pg.x")
    assert server.commands == []


def test_a_listing_too_long_to_keep_fails_instead_of_losing_names(monkeypatch):
    monkeypatch.setattr(databases, "QUERY_OUTPUT_MAX", 100)
    serve(monkeypatch, pg_spec(), FakeServer([f"db{i:03}" for i in range(50)]))
    with pytest.raises(DumpError, match="listing databases .* more than"):
        plan_dumps(pg_spec(), None, "jobs.j.databases[0]")


def test_a_database_named_globals_is_dumped_beside_the_roles_dump(monkeypatch):
    """A tenant's database called `globals` (or `:globals`) must not fail the whole server's plan."""
    serve(monkeypatch, pg_spec(), FakeServer(["app", "globals", ":globals"]))
    dumps = plan_dumps(pg_spec(), None, "jobs.j.databases[0]")
    check_unique(dumps, "jobs.j.databases")
    by_name = {d.artifact: parse_source(d.source) for d in dumps}
    assert by_name == {"pg.app": Source("postgres", "db", "app"),
                       "pg.globals": Source("postgres", "db", "globals"),
                       "pg.:globals": Source("postgres", "db", ":globals"),
                       "pg:globals": Source("postgres", "db", None, "globals")}


@pytest.mark.parametrize("artifact", ["pg", "pg.app", "pg.globals", "pg:globals", "pg.x:globals"])
def test_every_dump_of_an_entry_is_traced_back_to_it(artifact):
    assert databases.made_by(artifact, "pg") and databases.entry_of(artifact) == "pg"
    assert not databases.made_by(artifact, "p") and not databases.made_by("pgx:globals", "pg")


def test_entries_whose_names_meet_at_a_dot_clash(monkeypatch):
    serve(monkeypatch, pg_spec(), FakeServer(["x.y", "y"]))
    dumps = (plan_dumps(pg_spec(database=["x.y"]), None, "jobs.j.databases[0]")
             + plan_dumps(pg_spec(name="pg.x", database=["y"]), None, "jobs.j.databases[1]"))
    with pytest.raises(NameClashError, match="'pg.x.y'"):
        check_unique(dumps, "jobs.j.databases")
    check_unique(dumps[:1], "jobs.j.databases")


@pytest.mark.parametrize("name", HOSTILE)
def test_restore_creates_and_feeds_the_database_of_that_exact_name(name):
    server = FakeServer(["postgres"])
    restore_dump(Target(pg_spec(), postgres, server, {}, None, {}), Source("postgres", "db", name), [b"dump"],
                 force=False, where="restore pg.x")
    createdb = next(c for c in server.commands if c[0] == "createdb")
    pg_restore = next(c for c in server.commands if c[0] == "pg_restore")
    assert createdb[-2:] == ["--", name] and dbname(pg_restore) == name
    assert server.fed == [b"dump"]


def test_restore_refuses_a_non_empty_database_by_its_exact_name():
    server = FakeServer(["two words"], objects=3)
    with pytest.raises(RefusedError, match="database 'two words' .* not empty"):
        restore_dump(Target(pg_spec(), postgres, server, {}, None, {}), Source("postgres", "db", "two words"),
                     [b"dump"], force=False, where="restore pg.two words")
    counted = next(c for c in server.commands if "count" in c[-1].lower())
    assert dbname(counted) == "two words"


def test_local_runner_says_when_it_kept_only_the_tail_of_the_output():
    script = "import sys; sys.stdout.write('x' * 100 + 'END')"
    result = LocalRunner().run([sys.executable, "-c", script], {}, timeout=30, keep=10)
    assert result.truncated and result.stdout == "xxxxxxxEND"
    assert not LocalRunner().run([sys.executable, "-c", script], {}, timeout=30, keep=1000).truncated
