"""The one small interface every destination implements.

Everything above this module is destination-agnostic: a backup writes a
stream under a key, a restore reads it back, retention lists and deletes.
An upload becomes visible under its final key only on `commit()`; `abort()`
leaves nothing behind under that key. A process killed mid-upload cannot
abort: what it leaves (a hidden `.partial-` file, an open multipart upload)
is a leftover, which `leftovers()` lists and `remove_leftover()` removes;
which ones may go is decided above this interface (backupd.leftovers).
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Callable, Iterable, Iterator

from backupd.stream import IterReader

# Beside the archives of a backup (<job>/<backup id>/): its catalog record, for `catalog rebuild`.
MANIFEST = "manifest.json"
# Repository mode: where job J's restic repository lies under a destination's root (never a job name).
REPOSITORY_ROOT = "_restic"
# Local and SFTP uploads write `.<name>.partial-<random>` beside the final name, renamed on commit.
PARTIAL_MARK = ".partial-"


def is_partial(name: str) -> bool:
    """Is this file name an upload's hidden temporary file?"""
    return name.startswith(".") and PARTIAL_MARK in name


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: datetime | None = None


@dataclass(frozen=True)
class Leftover:
    """What an upload that never committed or aborted left on a store.

    `key` is where it is (the temporary file, or the key an open multipart upload
    was for), `modified` its last write (files) or its start (multipart uploads),
    and `upload_id` what the store needs to abort it, if anything.
    """

    key: str
    size: int
    modified: datetime | None = None
    upload_id: str | None = None


class ChunkReader(IterReader):
    """A readable file over chunks a store produces; close() releases the store's handle."""

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(chunks)
        self._on_close = on_close

    def close(self) -> None:
        if not self.closed:
            self._on_close()
        super().close()


class Upload(ABC):
    """An in-progress write of one object."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the object visible under its final key (durably)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; idempotent."""


class Store(ABC):
    """A destination: local directory, S3 bucket, SFTP server."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def open_upload(self, key: str) -> Upload: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; raises NotFoundError if missing."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every complete object under prefix (never in-progress uploads)."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; an object already gone is not an error."""

    @abstractmethod
    def leftovers(self) -> Iterator[Leftover]:
        """What interrupted uploads left under backupd's layout (<job>/<backup id>/)."""

    @abstractmethod
    def remove_leftover(self, leftover: Leftover) -> None:
        """Remove a leftover (delete the file, abort the upload); one already gone is not an error."""

    @abstractmethod
    def describe(self) -> str:
        """Where this store is, for messages; never includes credentials."""

    def close(self) -> None:
        """Release connections."""


def check_key(key: str) -> str:
    """Keys are relative, normalised POSIX paths: no '..', no absolute, no empty parts."""
    if not key or key.startswith("/") or posixpath.normpath(key) != key or ".." in key.split("/"):
        raise ValueError(f"invalid object key '{key}'")
    return key
