"""The tar guard against real GNU tar, on thousands of hostile archives.

Each archive goes through the guard (at some chunking), then what the guard
passed on goes into GNU tar with the restore helper's options, extracting into
a scratch target that has a sentinel directory beside it. For every case:
- nothing outside the target changes;
- when the guard accepts, the members it judged are exactly those `tar --list` reads;
- the guard ends within a time bound;
- the only exception the guard raises is IntegrityError (UnsafeArchiveError among them).

Needs GNU tar on the machine running the tests, not the Docker engine. Runs as
root (tar with --no-same-owner instead of --same-owner, so owners do not matter).
BACKUPD_FUZZ_EXAMPLES raises the number of generated archives for a longer hunt.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backupd.docker_host import MOUNT_POINT, TAR_EXTRACT
from backupd.errors import IntegrityError
from backupd.tarsafety import Member, TarChecker, guarded
from tests import tarforge as forge

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("BACKUPD_FUZZ_EXAMPLES", "2000"))
GUARD_SECONDS = 2.0
TAR_SECONDS = 20
SENTINEL = "@SENTINEL@"  # replaced by the sentinel directory's absolute path


class Recorder(TarChecker):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def check(self, member: Member) -> None:
        super().check(member)
        self.names.append(member.name)


class Scratch:
    """root/target (tar extracts here), root/sentinel/canary and root/outside: what must not change."""

    def __init__(self, root: Path) -> None:
        self.root, self.target, self.sentinel = root, root / "target", root / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "canary").write_bytes(b"untouched")
        (root / "outside").write_bytes(b"untouched")
        self.target.mkdir()
        self.before = self.outside()

    def outside(self) -> dict[str, tuple]:
        seen: dict[str, tuple] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames.remove("target")
                filenames = [f for f in filenames if f != "target"]
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st_ = os.lstat(path)
                extra: object = None
                if stat.S_ISREG(st_.st_mode):
                    extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                elif stat.S_ISLNK(st_.st_mode):
                    extra = os.readlink(path)
                seen[path] = (st_.st_mode, st_.st_uid, st_.st_size, st_.st_mtime_ns, extra)
        top = os.lstat(self.root)
        seen["."] = (top.st_mode, top.st_uid)
        return seen

    def reset_target(self) -> None:
        shutil.rmtree(self.target)  # never follows symlinks
        self.target.mkdir()

    def extract_command(self) -> list[str]:
        command = [str(self.target) if a == MOUNT_POINT else a for a in TAR_EXTRACT]
        return ["--no-same-owner" if a == "--same-owner" else a for a in command]


def run_guard(archive: bytes, chunk: int) -> tuple[bytes, list[str], Exception | None]:
    checker = Recorder()
    passed = bytearray()
    started = time.monotonic()
    try:
        for piece in guarded((archive[i:i + chunk] for i in range(0, len(archive), chunk)), checker):
            passed += piece
    except Exception as exc:  # noqa: BLE001 - the assertion below is the point
        error: Exception | None = exc
    else:
        error = None
    took = time.monotonic() - started
    assert error is None or isinstance(error, IntegrityError), f"the guard raised {error!r}"
    assert took < GUARD_SECONDS, f"the guard took {took:.1f} s"
    return bytes(passed), checker.names, error


def judge(scratch: Scratch, archive: bytes, chunk: int) -> None:
    archive = archive.replace(SENTINEL.encode(), str(scratch.sentinel).encode())
    passed, names, error = run_guard(archive, chunk)
    whole = run_guard(archive, len(archive))
    assert (names, repr(error)) == (whole[1], repr(whole[2])), "the chunking changed the verdict"
    assert error is not None or passed == whole[0], "the chunking changed the bytes passed on"

    # What production does: tar unpacks what the guard let through, then the stream stops.
    subprocess.run(scratch.extract_command(), input=passed, capture_output=True, timeout=TAR_SECONDS)
    try:
        assert scratch.outside() == scratch.before, "tar changed something outside the target"
    finally:
        scratch.reset_target()

    if error is None:
        listed = subprocess.run(["tar", "--list", "--file=-", "--quoting-style=literal"], input=archive,
                                capture_output=True, timeout=TAR_SECONDS)
        listed_names = listed.stdout.decode("utf-8", "surrogateescape").split("\n")[:-1]
        assert listed_names == names, f"tar lists {listed_names}, the guard judged {names}"
        assert listed.returncode == 0, f"tar --list failed on an archive the guard accepted: {listed.stderr!r}"


# ------------------------------------------------------------------ hand-made cases


def hidden(name: str = "hidden") -> bytes:
    """A member smuggled as another member's data."""
    return forge.member(name, data=b"pwned")


HAND_MADE: dict[str, bytes] = {
    "absolute link, then through it": forge.archive(
        forge.member("l", b"2", link=SENTINEL), forge.member("l/pwned", data=b"x")),
    "chain a -> ., b -> a/.., then through b": forge.archive(
        forge.member("a", b"2", link="."), forge.member("b", b"2", link="a/.."),
        forge.member("b/sentinel/pwned", data=b"x")),
    "link, directory of the same name, then through": forge.archive(
        forge.member("d", b"2", link="../sentinel"), forge.member("d", b"5"), forge.member("d/pwned", data=b"x")),
    "hard link to an absolute symlink, then through it": forge.archive(
        forge.member("l", b"2", link=SENTINEL), forge.member("h", b"1", link="l"),
        forge.member("h/pwned", data=b"x")),
    "hard link out": forge.archive(forge.member("h", b"1", link="../outside")),
    "hard link through a symlink": forge.archive(
        forge.member("l", b"2", link=".."), forge.member("h", b"1", link="l/outside")),
    "regular file named d/ carrying a header": forge.archive(forge.member("d/", data=hidden("../outside"))),
    "symlink carrying a header": forge.archive(forge.member("s", b"2", data=hidden("../x"), link="t")),
    "directory carrying a header": forge.archive(forge.member("dd", b"5", data=hidden())),
    "two spaces in a PAX record": forge.archive(
        forge.pax(b"27  path=../sentinel/pwned\n"), forge.member("ok", data=b"x")),
    "PAX record without a newline": forge.archive(forge.pax(b"22 path=../outside"), forge.member("ok")),
    "PAX length past the end": forge.archive(forge.pax(b"99 path=../outside\n"), forge.member("ok")),
    "size 1_024": forge.header("f", size=b"0000001_024\0") + bytes(1024) + forge.end(),
    "size +1024": forge.header("f", size=b"+1024\0") + bytes(1024) + forge.end(),
    "size with a leading blank": forge.header("f", size=b" 1024\0") + bytes(1024) + forge.end(),
    "negative base-256 size": forge.header("f", size=b"\xff" * 12) + bytes(4096),
    "two x headers": forge.archive(forge.pax(forge.record("path", "ok")),
                                   forge.pax(forge.record("path", "../outside")), forge.member("x")),
    "PAX path against a later GNU long name": forge.archive(
        forge.pax(forge.record("path", "../outside")), forge.long_name("ok"), forge.member("x")),
    "prefix under old-GNU magic": forge.archive(forge.member("x", prefix=b"..", magic=forge.OLD_GNU_MAGIC)),
    "prefix under POSIX magic": forge.archive(forge.member("x", prefix=b"..")),
    "sparse map longer than the data": forge.archive(
        forge.pax(forge.record("GNU.sparse.major", "1") + forge.record("GNU.sparse.minor", "0")
                  + forge.record("GNU.sparse.name", "sp") + forge.record("GNU.sparse.realsize", "8192")),
        forge.member("GNUSparseFile/sp", data=forge.pad(b"1\n0\n4096\n") + hidden("../outside"))),
    "sparse file as GNU tar writes it": forge.archive(
        forge.pax(forge.record("GNU.sparse.major", "1") + forge.record("GNU.sparse.minor", "0")
                  + forge.record("GNU.sparse.name", "./sp") + forge.record("GNU.sparse.realsize", "1048576")),
        forge.member("./GNUSparseFile.1/sp", data=forge.pad(b"2\n4096\n1000\n1048576\n0\n") + b"z" * 1000)),
    "ordinary tree with absolute links": forge.archive(
        forge.member("./", b"5"), forge.member("./bin/python3", b"2", link="/usr/bin/python3.11"),
        forge.member("./access.log", b"2", link="/dev/stdout"), forge.member("./up", b"2", link="../.."),
        forge.member("./f", data=b"data"), forge.member("./h", b"1", link="./f")),
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_hand_made_hostile_archives(name: str, tmp_path: Path) -> None:
    scratch = Scratch(tmp_path)
    for chunk in (1, 511, 513, 4096):
        judge(scratch, HAND_MADE[name], chunk)


# ------------------------------------------------------------------ generated cases

COMPONENTS = ["a", "l", "l", "d", ".", "..", "", "sentinel", "x" * 60]
LINK_TARGETS = st.sampled_from([".", "..", "/", "a", "a/..", "../sentinel", "../outside", "l/x", "d",
                                SENTINEL, SENTINEL + "/canary", "/etc", ""])
KINDS = st.sampled_from([b"0", b"0", b"\0", b"1", b"1", b"2", b"2", b"2", b"5", b"5", b"6", b"7", b"S", b"D"])
PAX_KEYS = st.sampled_from(["path", "linkpath", "size", "GNU.sparse.name", "GNU.sparse.major",
                            "GNU.sparse.minor", "GNU.sparse.realsize", "mtime", "comment", "other"])


# Names as one draw each (drawing is most of this test's time): up to three components,
# with or without a leading '/' or './' and a trailing '/'.
NAMES = st.sampled_from(sorted({
    lead + "/".join(parts) + tail
    for parts in itertools.chain.from_iterable(itertools.product(COMPONENTS, repeat=n) for n in (1, 2, 3))
    for lead in ("", "./", "/") for tail in ("", "/")}))


@st.composite
def size_fields(draw: st.DrawFn, size: int) -> bytes:
    form = draw(st.sampled_from(["octal", "octal", "octal", "spaces", "base256", "other", "raw"]))
    if form == "octal":
        return forge.octal(size, 12)
    if form == "spaces":
        return b"%11o " % size
    if form == "base256":
        return b"\x80" + size.to_bytes(11, "big")
    if form == "other":
        return draw(st.sampled_from([b"+%d" % size, b"%d_0" % size, b" -%o" % size, b"\xff" * 12,
                                     b"%o" % (size + 512), b"\0%o" % size]))
    return draw(st.binary(min_size=12, max_size=12))


@st.composite
def pax_records(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        key = draw(PAX_KEYS)
        value = draw(st.one_of(NAMES, LINK_TARGETS, st.sampled_from(["0", "1", "512", "1_0", " 5", "-1"])))
        good = forge.record(key, value)
        defect = draw(st.sampled_from(["none"] * 16 + ["two spaces", "no newline", "long", "short"]))
        if defect == "two spaces":
            good = good.replace(b" ", b"  ", 1)
        elif defect == "no newline":
            good = good[:-1]
        elif defect in ("long", "short"):
            length, _, rest = good.partition(b" ")
            good = b"%d %s" % (int(length) + (1 if defect == "long" else -1), rest)
        out += good
    return out


@st.composite
def pieces(draw: st.DrawFn, depth: int = 0) -> bytes:
    choice = draw(st.sampled_from(["member", "member", "member", "pax", "global", "long name", "long link"]))
    if choice == "pax":
        return forge.pax(draw(pax_records()))
    if choice == "global":
        return forge.pax(draw(pax_records()), b"g")
    if choice in ("long name", "long link"):
        return forge.long_name(draw(NAMES), b"L" if choice == "long name" else b"K")
    kind = draw(KINDS)
    if depth < 1 and draw(st.booleans()):
        data = draw(pieces(depth + 1))  # a header hidden as data
    else:
        data = draw(st.sampled_from([b"", b"x", b"y" * 600]))
    size = draw(size_fields(len(data)))
    magic = draw(st.sampled_from([forge.POSIX_MAGIC, forge.POSIX_MAGIC, forge.OLD_GNU_MAGIC, b"\0" * 8]))
    prefix = draw(st.sampled_from([b"", b"", b"a", b"..", b"/", b"l"]))
    block = forge.header(draw(NAMES), kind, size, draw(LINK_TARGETS), magic=magic, prefix=prefix)
    return block + forge.pad(data)


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(pieces(), min_size=1, max_size=6))) + forge.end())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # a few bytes changed anywhere,
        where = draw(st.integers(0, len(data) - 1))
        data[where] = draw(st.integers(0, 255))
        if draw(st.integers(0, 4)):  # mostly with the block's checksum made right again
            block = where - where % forge.BLOCK
            data[block + 148:block + 156] = b" " * 8
            data[block + 148:block + 156] = b"%06o\0 " % sum(data[block:block + forge.BLOCK])
    return bytes(data)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(archive=archives(), chunk=st.sampled_from([1, 100, 511, 513, 4096]))
def test_generated_hostile_archives(archive: bytes, chunk: int, tmp_path: Path) -> None:
    scratch = getattr(test_generated_hostile_archives, "scratch", None)
    if scratch is None or scratch.root != tmp_path:
        scratch = Scratch(tmp_path)
        test_generated_hostile_archives.scratch = scratch  # type: ignore[attr-defined]
    judge(scratch, archive, chunk)
