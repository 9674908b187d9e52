"""Local directory destination (the embedded default).

A copy is written as a hidden temporary file beside its final name, fsynced,
then renamed: a crash leaves only a `.partial` file, never a short archive
under the final name. Files are 0600 and the directories backupd makes 0700,
whatever the umask: an unencrypted dump is nobody else's to read.
"""

from __future__ import annotations

import io
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator

from backupd.errors import BackupdError, NotFoundError
from backupd.private import FILE_MODE, open_layout_dir
from backupd.storage.base import (PARTIAL_MARK, REPOSITORY_ROOT, Leftover, ObjectInfo, Store, Upload, check_key,
                                  is_partial)

DROP_BEHIND = 8 << 20  # bytes read before they are dropped from the page cache


class LocalUpload(Upload):
    """Written as a hidden 0600 file in a 0700 directory, then renamed; every step goes
    through the directory's fd, so nobody can swap a directory in between."""

    def __init__(self, root: Path, key: str) -> None:
        *parts, self.name = key.split("/")
        self.final = root / key
        self.temp_name = f".{self.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
        self._dir = open_layout_dir(root, parts, create=True)
        try:
            fd = os.open(self.temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE, dir_fd=self._dir)
        except BaseException:
            os.close(self._dir)
            raise
        self._file: BinaryIO | None = open(fd, "wb")

    def write(self, data: bytes) -> None:
        assert self._file is not None, "write after commit/abort"
        self._file.write(data)

    def commit(self) -> None:
        assert self._file is not None, "commit after commit/abort"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        try:
            if _exists(self.name, self._dir):
                os.unlink(self.temp_name, dir_fd=self._dir)
                raise BackupdError(f"refusing to overwrite existing archive '{self.final}'")
            os.rename(self.temp_name, self.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            os.fsync(self._dir)
        finally:
            self._close_dir()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir is not None:
            try:
                os.unlink(self.temp_name, dir_fd=self._dir)
            except FileNotFoundError:
                pass
            self._close_dir()

    def _close_dir(self) -> None:
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None  # type: ignore[assignment]


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class _ReadOnce(io.FileIO):
    """A copy read once, start to end (restore, verify): what was read leaves the page cache as it goes.

    A restore would otherwise fill the page cache with an archive nobody reads
    again, pushing out the host's working set (its databases). And readahead that
    reuses the pages just dropped costs less than fresh pages: reading a cold
    1.2 GB copy took 0.7 s instead of 1.2-1.9 s here (sys time 0.13 s instead of 0.7-1.7 s).
    """

    _dropped = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        position = self.tell()
        advise = getattr(os, "posix_fadvise", None)  # not on every OS: there, reads stay plain reads
        if advise is not None and position - self._dropped >= DROP_BEHIND:
            try:
                advise(self.fileno(), self._dropped, position - self._dropped, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only: a file system that refuses it is read as before
                pass
            self._dropped = position
        return data  # type: ignore[return-value]  # None only for non-blocking files


class LocalStore(Store):
    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name)
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def open_upload(self, key: str) -> Upload:
        try:
            return LocalUpload(self.root, check_key(key))
        except OSError as exc:
            raise BackupdError(
                f"destination '{self.name}': cannot write under {self.root}: {exc.strerror}"
            ) from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            return _ReadOnce(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"destination '{self.name}': '{key}' does not exist") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in sorted(files):
                if fname.startswith(".") and PARTIAL_MARK in fname:
                    continue
                path = Path(dirpath) / fname
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def leftovers(self) -> Iterator[Leftover]:
        for job in _subdirs(self.root):
            if job.name == REPOSITORY_ROOT:
                continue  # restic's, not backupd's layout
            for backup in _subdirs(Path(job.path)):
                for entry in _entries(Path(backup.path)):
                    if is_partial(entry.name) and entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        yield Leftover(f"{job.name}/{backup.name}/{entry.name}", st.st_size,
                                       datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def remove_leftover(self, leftover: Leftover) -> None:
        *parts, name = check_key(leftover.key).split("/")
        if not is_partial(name):
            raise ValueError(f"'{leftover.key}' is not a partial upload")
        try:  # through the directories' fds, links not followed, as uploads write
            fd = open_layout_dir(self.root, parts, create=False)
        except FileNotFoundError:
            return
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def describe(self) -> str:
        return f"local:{self.root}"


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):  # removed meanwhile (prune)
        return []


def _subdirs(path: Path) -> list[os.DirEntry[str]]:
    """Directories in `path`; links to directories are not followed (nothing outside is ours)."""
    return [e for e in _entries(path) if e.is_dir(follow_symlinks=False)]
