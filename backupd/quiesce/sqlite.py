"""SQLite: a consistent copy of a live database file, and putting one back.

A file copy of a database being written comes back corrupt, so the copy is
made with SQLite's online backup API, in one step: one read transaction, a
snapshot of one moment, while the application goes on writing (in WAL mode
it is not even blocked). The result must pass `PRAGMA integrity_check`
before a byte of it is streamed out.

Where it runs: a helper container that mounts the volume holding the file,
at the path the application sees, from an image with python3 (`image:`,
else helper_image; backupd's own image has it). Not `sqlite3` inside the
application's container: most images lack it, and the application's
container is stopped while a copy is put back. SQLite's locks are POSIX
locks on the file, and the helper shares the host's kernel and the file,
so it takes part in the same locking the application does.

The helper stats the file and becomes its owner before opening it, so any
file SQLite creates beside it (-wal, -shm, the restored file) belongs to the
application, never to root. It opens the live database read-only.
"""

from __future__ import annotations

from typing import Any

from backupd.config import DatabaseSpec
from backupd.docker_host import DockerHost
from backupd.quiesce.runner import HelperRunner

KIND = "sqlite"
PASSWORD_VARS: tuple[str, ...] = ()
SYSTEM_DATABASES: frozenset[str] = frozenset()
TOOL_CANDIDATES = {"python": ("python3",)}
# Stat what is there, and become the owner of the file (or of its directory): needs SETUID/SETGID,
# and DAC_READ_SEARCH to reach a directory only its owner may enter. All are gone after setuid.
CAPS = ("DAC_READ_SEARCH", "SETUID", "SETGID")

# One script, three modes: `dump PATH` (the copy, to stdout), `probe PATH` (how many schema
# objects the database has, or 'missing'), `restore PATH` (stdin becomes the file). Errors go to
# stderr as 'error: ...' and exit 2, which the dump path reports as the tool's message.
SCRIPT = r'''
import os, shutil, sqlite3, sys, tempfile, urllib.parse

mode, path = sys.argv[1], sys.argv[2]
directory = os.path.dirname(path)


def fail(message):
    sys.stderr.write("error: " + message + "\n")
    sys.exit(2)


def uri(p, ro):
    return "file:" + urllib.parse.quote(p) + ("?mode=ro" if ro else "")


def check(db, what):
    result = [row[0] for row in db.execute("PRAGMA integrity_check")]
    if result != ["ok"]:
        fail(what + " fails PRAGMA integrity_check: " + "; ".join(result[:5]))


try:
    st = os.stat(path)
    exists = True
except FileNotFoundError:
    if mode != "restore":
        if mode == "probe":
            print("missing")
            sys.exit(0)
        fail("database file " + path + " does not exist")
    try:
        st = os.stat(directory)
    except OSError as exc:
        fail("directory " + directory + ": " + exc.strerror)
    exists = False
except OSError as exc:
    fail(path + ": " + exc.strerror)
os.setgroups([])
os.setgid(st.st_gid)
os.setuid(st.st_uid)

try:
    if mode == "probe":
        db = sqlite3.connect(uri(path, True), uri=True, timeout=60)
        print(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    elif mode == "dump":
        work = tempfile.mkdtemp(prefix="backupd-sqlite-")
        try:
            copy = os.path.join(work, "copy.db")
            src = sqlite3.connect(uri(path, True), uri=True, timeout=60)
            dst = sqlite3.connect(copy)
            src.backup(dst)  # every page in one step: one read transaction, one moment
            src.close()
            check(dst, "the copy of " + path)
            dst.close()
            f = open(copy, "rb")
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the copy is read through f: no copy of the data stays
        with f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    elif mode == "restore":
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".backupd-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            db = sqlite3.connect(uri(tmp, False), uri=True)
            check(db, "the restored copy")
            db.close()
            if exists:
                os.chmod(tmp, st.st_mode & 0o7777)
            # The old database's journal or WAL would be applied to the new file: they go first.
            for suffix in ("-wal", "-shm", "-journal"):
                try:
                    os.unlink(path + suffix)
                except FileNotFoundError:
                    pass
            os.replace(tmp, path)
            dfd = os.open(directory, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except BaseException:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            raise
    else:
        fail("unknown mode " + mode)
except sqlite3.Error as exc:
    fail(path + ": " + str(exc))
'''


def password_env(password: str | None) -> dict[str, str]:
    return {}


def command(mode: str, path: str) -> list[str]:
    return ["python3", "-c", SCRIPT, mode, path]


def runner(host: DockerHost, container: Any, spec: DatabaseSpec, where: str) -> HelperRunner:
    """A helper that mounts the volume holding the file, where the container mounts it."""
    assert spec.path is not None
    mount = host.mount_holding(container, spec.path, where)
    image = spec.image or host.helper_image
    return HelperRunner(host, [mount], image, CAPS,
                        f"a helper from image '{image}' (image:) for '{spec.path}' of container '{container.name}'")


def dump_everything(spec: DatabaseSpec, tools: dict[str, str]) -> list[str]:
    assert spec.path is not None
    return command("dump", spec.path)
