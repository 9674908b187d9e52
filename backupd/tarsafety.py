"""Checks that make an archive safe to unpack: archives are untrusted on restore.

A member is refused when its name is absolute or climbs with '..', when its
path runs through a symlink the archive itself created (the classic way to
write outside the target), or when it is a link that points outside the
target (symlinks with absolute targets included).

`guarded` checks a tar stream *as it flows*: it parses each header (ustar,
GNU long names, PAX records) and refuses a member before its header block is
passed on, so tar downstream never sees an unsafe member. Header checksums
are verified, so a corrupt or desynchronised stream fails as not well-formed.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from backupd.errors import IntegrityError

BLOCK = 512
PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
GNU_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
NO_DATA_TYPES = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                 tarfile.FIFOTYPE)
ZERO_BLOCK = bytes(BLOCK)
# PAX and GNU long-name headers are held whole before the member they describe; a larger one
# would make the guard hold an attacker-chosen amount of memory. GNU tar writes a few KiB
# (a sparse map of a million holes would be about 20 MiB).
MAX_EXTENDED_HEADER = 64 << 20


@dataclass(frozen=True)
class Member:
    name: str
    linkname: str
    type: bytes

    def issym(self) -> bool:
        return self.type == tarfile.SYMTYPE

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE


def _normal(name: str) -> str:
    name = name.removeprefix("./") if name != "./" else "."
    return posixpath.normpath(name) if name else "."


def _escapes(path: str) -> bool:
    return path == ".." or path.startswith("../") or path.startswith("/")


class TarChecker:
    """Feed members in archive order; raises IntegrityError on the first unsafe one."""

    def __init__(self) -> None:
        self.symlinks: set[str] = set()
        self.members = 0

    def _through_symlink(self, path: str) -> str | None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self.symlinks:
                return prefix
        return None

    def check(self, member: Member | tarfile.TarInfo) -> None:
        self.members += 1
        raw = member.name
        if raw.startswith("/"):
            raise IntegrityError(f"unsafe archive: member '{raw}' has an absolute path")
        if ".." in raw.split("/"):
            raise IntegrityError(f"unsafe archive: member '{raw}' contains '..'")
        path = _normal(raw)
        via = self._through_symlink(path)
        if via is not None:
            raise IntegrityError(f"unsafe archive: member '{raw}' passes through symlink '{via}'")
        if member.issym():
            target = member.linkname
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
            if target.startswith("/") or _escapes(resolved):
                raise IntegrityError(
                    f"unsafe archive: symlink '{raw}' -> '{target}' points outside the target")
            self.symlinks.add(path)
        elif member.islnk():
            target = member.linkname
            if target.startswith("/") or ".." in target.split("/"):
                raise IntegrityError(
                    f"unsafe archive: hard link '{raw}' -> '{target}' points outside the target")
            if self._through_symlink(_normal(target)) is not None:
                raise IntegrityError(
                    f"unsafe archive: hard link '{raw}' -> '{target}' passes through a symlink")
        else:
            self.symlinks.discard(path)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes, what: str) -> int:
    try:
        return tarfile.nti(field)
    except tarfile.InvalidHeaderError:
        raise IntegrityError(f"archive is not a well-formed tar: bad {what} field") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """'%d key=value\\n' records; raw bytes kept (hdrcharset=BINARY names)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise IntegrityError("archive is not a well-formed tar: bad PAX record") from None
        if length <= 0 or space < 0:
            raise IntegrityError("archive is not a well-formed tar: bad PAX record")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def guarded(chunks: Iterable[bytes], checker: TarChecker | None = None) -> Iterator[bytes]:
    """Pass a tar stream through, refusing an unsafe or malformed member before its header.

    What is passed on is a prefix of what came in (views, no copies: contents
    are never touched), cut after the end-of-archive mark.
    """
    checker = checker or TarChecker()
    tail = b""  # an incomplete header waiting for the next chunk
    skip = 0  # content bytes of the current member still to pass through
    pending: dict[str, str] = {}  # long name/link from PAX or GNU headers, for the next member
    ended = False
    for chunk in chunks:
        if ended:
            continue  # padding after the end mark: read (the caller's checksum needs it), not sent
        data = tail + chunk if tail else chunk
        pos, n = 0, len(data)
        while True:
            if skip:
                step = min(skip, n - pos)
                pos += step
                skip -= step
                if skip:
                    break
            if n - pos < BLOCK:
                break
            header = bytes(data[pos:pos + BLOCK])
            if header == ZERO_BLOCK:
                # The end-of-archive mark. Only the mark is passed on: a reader that has
                # stopped at it (tar in a helper that has exited) may never take the padding.
                ended = True
                break
            kind, size = _header_fields(header)
            if kind in PAX_TYPES or kind in GNU_LONG:
                if size > MAX_EXTENDED_HEADER:
                    raise IntegrityError(f"unsafe archive: an extended header of {size} bytes "
                                         f"(more than {MAX_EXTENDED_HEADER >> 20} MiB)")
                need = BLOCK + _padded(size)
                if n - pos < need:
                    break  # wait for the whole extended header
                _extended(kind, bytes(data[pos + BLOCK:pos + BLOCK + size]), pending)
                pos += need
                continue
            checker.check(_member(header, kind, pending))  # raises before the header is passed on
            if "size" in pending:
                size = int(pending["size"])
            pending.clear()
            pos += BLOCK
            skip = _padded(size) if kind not in NO_DATA_TYPES else 0
        if ended:
            if pos:
                yield memoryview(data)[:pos]
            yield bytes(2 * BLOCK)
            continue
        if pos:
            yield memoryview(data)[:pos] if pos < n else data
        tail = bytes(data[pos:])
    if not ended and (tail or skip or checker.members == 0):
        raise IntegrityError("archive is not a well-formed tar: it ends in the middle of a member")


def _header_fields(header: bytes) -> tuple[bytes, int]:
    """Type and size of a header block whose checksum is right."""
    recorded = _number(header[148:156], "checksum")
    # The checksum field counts as spaces. The signed sum (some old tars) only when needed.
    if recorded != sum(header) - sum(header[148:156]) + 8 * 32 and \
            recorded not in tarfile.calc_chksums(header):
        raise IntegrityError("archive is not a well-formed tar: header checksum mismatch")
    return header[156:157] or tarfile.REGTYPE, _number(header[124:136], "size")


def _extended(kind: bytes, data: bytes, pending: dict[str, str]) -> None:
    """Note the long name/link (and PAX size) an extended header gives the next member."""
    if kind in PAX_TYPES:
        records = _pax_records(data)
        names = {k: v for k, v in records.items() if k in ("path", "linkpath", "GNU.sparse.name")}
        if kind == tarfile.XGLTYPE:
            if names:
                raise IntegrityError("unsafe archive: a global PAX header renames members")
        else:
            pending.update(names)
            if "size" in records:
                pending["size"] = records["size"]
    elif kind == tarfile.GNUTYPE_LONGNAME:
        pending["path"] = _text(data)
    elif kind == tarfile.GNUTYPE_LONGLINK:
        pending["linkpath"] = _text(data)


def _member(header: bytes, kind: bytes, pending: dict[str, str]) -> Member:
    if kind == tarfile.GNUTYPE_SPARSE:
        raise IntegrityError("archive uses old GNU sparse members, which backupd never writes")
    name = _text(header[0:100])
    if header[257:262] == b"ustar" and header[345:346] != b"\0":
        name = _text(header[345:500]) + "/" + name
    path = pending.get("GNU.sparse.name", pending.get("path", name))
    return Member(path, pending.get("linkpath", _text(header[157:257])), kind)


def check_tar_stream(fileobj: IO[bytes]) -> int:
    """Read a whole tar stream, check every member, return the member count.

    Also proves the tar is well-formed: a truncated or corrupt archive raises.
    """
    checker = TarChecker()
    for _ in guarded(iter(lambda: fileobj.read(1 << 20), b""), checker):
        pass
    return checker.members
