"""Checks that make an archive safe to unpack: archives are untrusted on restore.

A member is refused when its name is absolute or climbs with '..', when its
path runs through a symlink the archive itself created (the classic way to
write outside the target), or when it is a link that points outside the target.
The checks run on a full pass over the archive before anything is written.
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import IO

from backupd.errors import IntegrityError


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

    def check(self, member: tarfile.TarInfo) -> None:
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


def check_tar_stream(fileobj: IO[bytes]) -> int:
    """Read a whole tar stream, check every member, return the member count.

    Also proves the tar is well-formed: a truncated or corrupt archive raises.
    """
    checker = TarChecker()
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                checker.check(member)
    except tarfile.TarError as exc:
        raise IntegrityError(f"archive is not a well-formed tar: {exc}") from None
    return checker.members
