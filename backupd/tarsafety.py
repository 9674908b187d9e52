"""The tar guard: archives are untrusted on restore.

`guarded` (and TarGuard, its push-fed form) checks a tar stream *as it flows*
and refuses a member before its header block is passed on, so tar downstream
never sees it. Restore and verify read through it; a backup watches its own
stream through it as it is stored, so a volume restore would refuse fails then. It reads the
stream exactly as GNU tar 1.34 reads it, or refuses: a header tar would read
differently from the guard is a way round the guard.

How tar reads, and so the guard:
- Numbers: octal (leading spaces, then digits, then a space or NUL), or
  base-256 with a leading 0x80. Anything else (negative base-256, tar's
  obsolete base-64, `+1`, `1_0`) is refused.
- Header checksums are verified (the unsigned and the old signed sum).
- The first all-zero block ends the archive.
- Extended headers: of several `x` headers before a member only the last
  counts, and of several GNU long names (`L`, `K`) only the last; a PAX
  `path`/`linkpath` wins over a GNU long name, and `GNU.sparse.name` over
  both. The ustar `prefix` field is part of the name only under the POSIX
  magic (`ustar\\0`), never under the old GNU one.
- PAX records must be exactly `LEN KEY=VALUE\\n` with LEN the record's
  length; keys the guard does not know, and any key in a global (`g`) header
  that names, sizes or lays out members, are refused.
- A regular file whose name ends in `/` is a directory to tar, which then
  reads its data as headers: refused unless it has no data. So are data on
  links, directories and special files, old GNU sparse members, and types
  tar would unpack as something else.
- Sparse files (PAX 1.0, as GNU tar writes them): the map at the start of the
  data is read as tar reads it; a map tar would read past the member's data
  is refused.

What is refused as unsafe (the archive's own symlinks are followed through
the tree it has built so far, never judged as strings):
- a member whose name is absolute or has a `..` component;
- a member whose path runs through a symlink the archive created (the way to
  write outside the target: `l -> /etc` then `l/passwd`), and a member that
  would replace such a symlink (tar keeps a symlink to a directory in place
  of a directory member);
- a hard link whose target is absolute, has `..`, or runs through a symlink.
Symlink targets themselves are data: absolute ones, dangling ones and ones
pointing above the target are restored as they were.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from backupd.errors import IntegrityError, UnsafeArchiveError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# PAX and GNU long-name headers (and a sparse file's map) are held whole before the member
# they describe; a larger one would make the guard hold an attacker-chosen amount of memory.
# GNU tar writes a few KiB (a sparse map of a million holes would be about 20 MiB).
MAX_EXTENDED_HEADER = 64 << 20
OFF_MAX = (1 << 63) - 1  # tar's off_t

REGULAR = (b"0", b"\0", b"7")  # tar unpacks contiguous files ('7') as regular files
SYMLINK, HARDLINK, DIRECTORY = b"2", b"1", b"5"
NO_DATA = (SYMLINK, HARDLINK, DIRECTORY, b"3", b"4", b"6")  # links, devices, directories, FIFOs
PAX, PAX_GLOBAL, SOLARIS_PAX, LONG_NAME, LONG_LINK = b"x", b"g", b"X", b"L", b"K"
EXTENDED = (PAX, PAX_GLOBAL, SOLARIS_PAX, LONG_NAME, LONG_LINK)

# PAX keys that only carry metadata: tar does not lay out or name members by them.
_METADATA_KEYS = frozenset({"atime", "ctime", "mtime", "uid", "gid", "uname", "gname", "charset", "comment",
                            "hdrcharset", "SCHILY.dev", "SCHILY.ino", "SCHILY.nlink", "SCHILY.devmajor",
                            "SCHILY.devminor", "RHT.security.selinux"})
_METADATA_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.", "SCHILY.acl.")
_MEMBER_KEYS = frozenset({"path", "linkpath", "size", "GNU.sparse.name", "GNU.sparse.major",
                          "GNU.sparse.minor", "GNU.sparse.realsize"})
_OCTAL = re.compile(rb" *([0-7]+)[ \0]*|\0+")  # tar reads an all-NUL field as 0
_DECIMAL = re.compile(rb"[0-9]+")
_RECORD_LENGTH = re.compile(rb"[1-9][0-9]{0,19} ")
_PAX_TIME = re.compile(r"-?[0-9]{1,18}(\.[0-9]+)?")  # tar's decode_time, within time_t
ID_MAX = (1 << 32) - 1  # uid_t, gid_t
DEV_MAX = (1 << 31) - 1
SPARSE_LINE_MAX = 20  # tar reads a sparse map number into a 21-byte buffer: 19 digits and '\n'


def _malformed(what: str) -> IntegrityError:
    return IntegrityError(f"archive is not a well-formed tar: {what}")


def _unsafe(what: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"unsafe archive: {what}")


@dataclass(frozen=True)
class Member:
    name: str  # as tar reads it, before any normalisation
    linkname: str
    type: bytes  # the header's type flag; a regular file named 'd/' is a DIRECTORY
    size: int = 0  # bytes of data that follow the header

    def issym(self) -> bool:
        return self.type == SYMLINK

    def islnk(self) -> bool:
        return self.type == HARDLINK


def _components(name: str) -> tuple[str, ...]:
    """A relative name as the kernel walks it: '' and '.' components change nothing."""
    return tuple(part for part in name.split("/") if part not in ("", "."))


class TarChecker:
    """Feed members in archive order; raises UnsafeArchiveError on the first unsafe one.

    Keeps which paths the archive has made symlinks, so each member is judged
    against the tree the archive has built so far. Restores go into an empty
    volume, so nothing else is there.
    """

    def __init__(self) -> None:
        self.symlinks: set[tuple[str, ...]] = set()
        self.members = 0

    def _through_symlink(self, path: tuple[str, ...]) -> str | None:
        for i in range(1, len(path)):
            if path[:i] in self.symlinks:
                return "/".join(path[:i])
        return None

    def check(self, member: Member) -> None:
        self.members += 1
        raw = member.name
        path = self._relative(raw, "member")
        if not path and member.type != DIRECTORY:
            raise _unsafe(f"member '{raw}' would replace the target directory itself")
        via = self._through_symlink(path)
        if via is not None:
            raise _unsafe(f"member '{raw}' passes through symlink '{via}'")
        if path in self.symlinks:
            raise _unsafe(f"member '{raw}' replaces a symlink the archive made")
        if member.issym():
            self.symlinks.add(path)
        elif member.islnk():
            target = self._relative(member.linkname, f"hard link '{raw}' ->")
            if not target:
                raise _unsafe(f"hard link '{raw}' points at the target directory")
            via = self._through_symlink(target)
            if via is not None:
                raise _unsafe(f"hard link '{raw}' -> '{member.linkname}' passes through symlink '{via}'")
            if target in self.symlinks:
                self.symlinks.add(path)  # a hard link to a symlink is that symlink again

    @staticmethod
    def _relative(name: str, what: str) -> tuple[str, ...]:
        if not name:
            raise _unsafe(f"{what} '' has an empty name")
        if name.startswith("/"):
            raise _unsafe(f"{what} '{name}' has an absolute path")
        if ".." in name.split("/"):
            raise _unsafe(f"{what} '{name}' contains '..'")
        return _components(name)


# ------------------------------------------------------------------ reading as GNU tar 1.34 reads


def _text(raw: bytes) -> str:
    """A NUL-terminated header field or GNU long name, as the C string tar uses."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _octal(field: bytes, what: str) -> int:
    """Leading spaces, octal digits, then spaces or NULs: the part of tar's reading backupd accepts."""
    match = _OCTAL.fullmatch(field)
    if match is None:
        raise _malformed(f"bad {what} field {field!r}")
    digits = match.group(1)
    return int(digits, 8) if digits else 0


def _number(field: bytes, what: str, maximum: int) -> int:
    """A header number: octal, or positive base-256 (0x80 then big-endian bytes), as tar reads it."""
    if field[:1] == b"\x80":
        value = int.from_bytes(field[1:], "big")
    elif field[:1] == b"\xff":
        raise _malformed(f"a negative {what}")
    else:
        value = _octal(field, what)
    if value > maximum:
        raise _malformed(f"a {what} of {value}")
    return value


def _size(field: bytes) -> int:
    return _number(field, "size", OFF_MAX)


def _check_numbers(header: bytes, kind: bytes) -> None:
    """The numbers tar decodes for every member: one it cannot read fails the restore."""
    _number(header[100:108], "mode", (1 << 63) - 1)
    _number(header[108:116], "uid", ID_MAX)
    _number(header[116:124], "gid", ID_MAX)
    _number(header[136:148], "mtime", OFF_MAX)
    if kind in (b"3", b"4"):
        _number(header[329:337], "device major", DEV_MAX)
        _number(header[337:345], "device minor", DEV_MAX)


def _decimal(value: str, what: str, maximum: int = OFF_MAX) -> int:
    """A PAX number as tar's decode_num reads it: ASCII digits only, within range."""
    raw = value.encode("utf-8", "surrogateescape")
    if _DECIMAL.fullmatch(raw) is None or int(raw) > maximum:
        raise _malformed(f"bad {what} {value!r}")
    return int(raw)


def _checksum_ok(header: bytes) -> None:
    """The unsigned sum (POSIX) or, when that fails, the signed one (some old tars)."""
    recorded = _octal(header[148:156], "checksum")
    if recorded == sum(header) - sum(header[148:156]) + 8 * 32:
        return
    signed = sum(struct.unpack_from("148b", header)) + sum(struct.unpack_from("356b", header, 156)) + 8 * 32
    if recorded != signed:
        raise _malformed("header checksum mismatch")


def _pax_records(data: bytes) -> dict[str, str]:
    """'LEN KEY=VALUE\\n' records, each exactly LEN bytes; anything else is refused.

    Later records win over earlier ones with the same key, as in tar. Values keep
    their raw bytes (hdrcharset=BINARY names) through surrogateescape.
    """
    records: dict[str, str] = {}
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        match = _RECORD_LENGTH.match(data, pos)
        if match is None:
            raise _malformed("a PAX record without a plain 'LEN ' prefix")
        length = int(match.group()[:-1])
        stop = pos + length
        if stop > end or data[stop - 1] != 0x0A:
            raise _malformed("a PAX record whose length does not end at its newline")
        key, equals, value = data[match.end():stop - 1].partition(b"=")
        if not equals or not key or b"\0" in key:
            raise _malformed("a PAX record without a KEY=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = stop
    if data[pos:] != bytes(end - pos):
        raise _malformed("bytes after the last PAX record")
    return records


def _judge_keys(records: dict[str, str], allowed: frozenset[str], where: str) -> None:
    for key in records:
        if key not in allowed and key not in _METADATA_KEYS and not key.startswith(_METADATA_PREFIXES):
            raise _unsafe(f"PAX record '{key}' in {where}, which the guard cannot judge")
    for key in ("path", "linkpath", "GNU.sparse.name"):
        if "\0" in records.get(key, ""):
            raise _unsafe(f"PAX record '{key}' holds a NUL")
    for key in ("mtime", "atime", "ctime"):
        if key in records and _PAX_TIME.fullmatch(records[key]) is None:
            raise _malformed(f"bad PAX {key} {records[key]!r}")
    for key, maximum in (("uid", ID_MAX), ("gid", ID_MAX), ("SCHILY.devmajor", DEV_MAX),
                         ("SCHILY.devminor", DEV_MAX)):
        if key in records:
            _decimal(records[key], f"PAX {key}", maximum)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class _Pending:
    """Extended headers read since the last member; they describe the next one."""

    pax: dict[str, str] | None = None  # the last 'x' header's records
    long_name: str | None = None  # the last GNU 'L'
    long_link: str | None = None  # the last GNU 'K'


def _sparse_blocks(data: bytes, real_size: int) -> int | None:
    """Blocks tar reads for a PAX 1.0 sparse member's map and regions; None: more data needed.

    The map is decimal lines at the start of the data: a count, then offset and
    size pairs, padded to a block. Each region is read in whole blocks.
    """
    pos = 0

    def number(maximum: int) -> int | None:
        nonlocal pos
        newline = data.find(b"\n", pos, pos + SPARSE_LINE_MAX)
        if newline < 0:
            if len(data) - pos < SPARSE_LINE_MAX:
                return None
            raise _malformed("a sparse map number too long")
        digits = data[pos:newline]
        pos = newline + 1
        if _DECIMAL.fullmatch(digits) is None or int(digits) > maximum:
            raise _malformed("a malformed sparse map")
        return int(digits)

    count = number((1 << 64) - 1)
    if count is None:
        return None
    regions = 0
    for _ in range(count):
        offset = number(OFF_MAX)
        length = number(OFF_MAX) if offset is not None else None
        if offset is None or length is None:
            return None
        if offset + length > min(real_size, OFF_MAX):
            raise _malformed("a sparse map region beyond the file's size")
        regions += _padded(length) // BLOCK
    return _padded(pos) // BLOCK + regions


@dataclass(frozen=True)
class _Step:
    passed: int  # bytes of headers (and held data) judged and passed on
    skip: int  # data bytes that follow, passed through unread


class _Reader:
    """Reads header blocks as GNU tar 1.34 does and hands each member to the checker."""

    def __init__(self, checker: TarChecker) -> None:
        self.checker = checker
        self.pending = _Pending()

    def step(self, data: bytes | memoryview, pos: int) -> _Step | int:
        """Judge the header at data[pos:] (at least a block), or say how many bytes from pos it needs."""
        header = bytes(data[pos:pos + BLOCK])
        _checksum_ok(header)
        kind = header[156:157]
        size = _size(header[124:136])
        available = len(data) - pos - BLOCK
        if kind in EXTENDED:
            if size > MAX_EXTENDED_HEADER:
                raise _unsafe(f"an extended header of {size} bytes "
                              f"(more than {MAX_EXTENDED_HEADER >> 20} MiB)")
            if available < _padded(size):
                return BLOCK + _padded(size)  # wait for the whole extended header
            self._extended(kind, bytes(data[pos + BLOCK:pos + BLOCK + size]))
            return _Step(BLOCK + _padded(size), 0)
        member, sparse = self._member(header, kind, size)
        if sparse is not None:
            held = min(_padded(member.size), MAX_EXTENDED_HEADER)
            blocks = _sparse_blocks(bytes(data[pos + BLOCK:pos + BLOCK + min(available, held)]), sparse)
            if blocks is None:
                if available < held:
                    return BLOCK + available + 1  # wait for the rest of the map
                raise _malformed(f"the sparse map of '{member.name}' runs past its data")
            if blocks * BLOCK > _padded(member.size):
                raise _malformed(f"the sparse map of '{member.name}' runs past its data")
        self.checker.check(member)  # raises before the header is passed on
        self.pending = _Pending()
        return _Step(BLOCK, _padded(member.size))

    def _extended(self, kind: bytes, data: bytes) -> None:
        if kind == PAX_GLOBAL:
            # tar applies a global header to every later member: only metadata is judged safe
            _judge_keys(_pax_records(data), frozenset(), "a global PAX header")
        elif kind in (PAX, SOLARIS_PAX):
            records = _pax_records(data)
            _judge_keys(records, _MEMBER_KEYS, "a PAX header")
            self.pending.pax = records  # tar keeps only the last one
        elif kind == LONG_NAME:
            self.pending.long_name = _text(data)
        else:
            self.pending.long_link = _text(data)

    def _member(self, header: bytes, kind: bytes, size: int) -> tuple[Member, int | None]:
        """The member as tar reads it, and a PAX 1.0 sparse file's real size (else None)."""
        if kind not in REGULAR and kind not in NO_DATA:
            raise _unsafe(f"member type {kind!r}, which backupd never writes")
        _check_numbers(header, kind)
        pax = self.pending.pax or {}
        name = _text(header[0:100])
        if header[257:263] == b"ustar\0" and header[345] != 0:
            name = _text(header[345:500]) + "/" + name  # the prefix field, POSIX magic only
        if self.pending.long_name is not None:
            name = self.pending.long_name
        name = pax.get("GNU.sparse.name", pax.get("path", name))
        linkname = pax.get("linkpath", self.pending.long_link)
        if linkname is None:
            linkname = _text(header[157:257])
        if "size" in pax:
            size = _decimal(pax["size"], "PAX size")
        if kind in REGULAR and name.endswith("/"):
            kind = DIRECTORY  # tar reads a regular file named 'd/' as a directory, its data as headers
        if kind in NO_DATA and size:
            raise _unsafe(f"member '{name}' of type {kind!r} carries {size} bytes of data")
        member = Member(name, linkname, kind, size)
        sparse_keys = {key for key in pax if key.startswith("GNU.sparse.") and key != "GNU.sparse.name"}
        if not sparse_keys:
            return member, None
        if kind not in REGULAR or pax.get("GNU.sparse.major") != "1" or pax.get("GNU.sparse.minor") != "0" \
                or not sparse_keys <= {"GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.realsize"}:
            raise _unsafe(f"member '{name}' is a sparse form backupd never writes")
        real_size = size
        if "GNU.sparse.realsize" in pax:
            real_size = _decimal(pax["GNU.sparse.realsize"], "sparse real size")
        return member, real_size


class TarGuard:
    """The guard, fed a chunk at a time: `feed` returns what may be passed on of it
    (views, no copies, a prefix of the stream cut after the end-of-archive mark) and
    raises on an unsafe or malformed member before its header is returned; `close`
    checks that the stream ended where an archive may end.

    Pushed to where bytes are pushed (a backup's stream as it is stored); `guarded`
    pulls through it (a restore's stream on its way to tar).
    """

    def __init__(self, checker: TarChecker | None = None) -> None:
        self.checker = checker or TarChecker()
        self._reader = _Reader(self.checker)
        self._tail = b""  # incomplete headers waiting for the next chunk
        self._need = BLOCK  # bytes the header at the start of tail needs before it can be judged
        self._skip = 0  # content bytes of the current member still to pass through
        self.ended = False

    def feed(self, chunk: bytes | memoryview) -> list[bytes | memoryview]:
        if self.ended:
            return []  # padding after the end mark: read (the caller's checksum needs it), not sent
        reader, need, skip = self._reader, self._need, self._skip
        data = self._tail + chunk if self._tail else chunk
        pos, n = 0, len(data)
        while True:
            if skip:
                step = min(skip, n - pos)
                pos += step
                skip -= step
                if skip:
                    break
            if n - pos < need:
                break
            if data[pos:pos + BLOCK] == ZERO_BLOCK:
                # The end-of-archive mark: tar stops at the first zero block. Only the mark is
                # passed on: a reader that has stopped at it may never take the padding.
                self.ended = True
                return [memoryview(data)[:pos], bytes(2 * BLOCK)] if pos else [bytes(2 * BLOCK)]
            taken = reader.step(data, pos)  # raises: the guard is spent, the stream refused
            if isinstance(taken, int):
                need = taken
                break
            pos += taken.passed
            skip = taken.skip
            need = BLOCK
        self._need, self._skip = need, skip
        self._tail = bytes(data[pos:])
        if not pos:
            return []
        return [memoryview(data)[:pos] if pos < n else data]

    def write(self, chunk: bytes | memoryview) -> None:
        """Judge a chunk and pass nothing on: a backup watching the stream it stores."""
        self.feed(chunk)

    def close(self) -> None:
        if not self.ended and (self._tail or self._skip or self.checker.members == 0):
            raise _malformed("it ends in the middle of a member")


def guarded(chunks: Iterable[bytes], checker: TarChecker | None = None) -> Iterator[bytes]:
    """Pass a tar stream through, refusing an unsafe or malformed member before its header.

    What is passed on is a prefix of what came in (views, no copies: contents
    are never touched), cut after the end-of-archive mark.
    """
    guard = TarGuard(checker)
    for chunk in chunks:
        yield from guard.feed(chunk)  # type: ignore[misc]
    guard.close()


def check_tar_stream(fileobj: IO[bytes]) -> int:
    """Read a whole tar stream, check every member, return the member count.

    Also proves the tar is well-formed: a truncated or corrupt archive raises.
    """
    checker = TarChecker()
    for _ in guarded(iter(lambda: fileobj.read(1 << 20), b""), checker):
        pass
    return checker.members
