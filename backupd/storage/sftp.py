"""SFTP destination (paramiko).

The server's host key is verified before any credential is sent: against a
known_hosts file or a pinned SHA256 fingerprint. An unknown or changed key is
refused; nothing is ever auto-accepted. Uploads go to a hidden temporary name
in the same directory and are renamed (posix-rename) only when complete.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import posixpath
import socket
import stat
import uuid
from datetime import datetime, timezone
from typing import BinaryIO, Iterator

import paramiko

from backupd.config import SftpDestination
from backupd.errors import BackupdError, NotFoundError
from backupd.retry import retry
from backupd.storage.base import ChunkReader, ObjectInfo, Store, Upload, check_key
from backupd.stream import CHUNK

log = logging.getLogger(__name__)
PARTIAL_MARK = ".partial-"
READ_WINDOW = 8 * CHUNK  # bytes requested ahead while reading: the memory bound of a read


class HostKeyError(BackupdError):
    """The server's host key is unknown or changed: refused, never accepted."""


def fingerprint(key: paramiko.PKey) -> str:
    """SHA256:... as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (HostKeyError, paramiko.AuthenticationException)):
        return False
    return isinstance(exc, (OSError, EOFError, paramiko.SSHException))


class SftpStore(Store):
    def __init__(self, name: str, spec: SftpDestination) -> None:
        super().__init__(name)
        self.spec = spec
        self.root = spec.path.rstrip("/") or "/"
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def describe(self) -> str:
        return f"sftp://{self.spec.user}@{self.spec.host}:{self.spec.port}{'/' if not self.root.startswith('/') else ''}{self.root}"

    # ------------------------------------------------------------ connection

    def _verify_host_key(self, key: paramiko.PKey) -> None:
        got = fingerprint(key)
        if self.spec.host_key_fingerprint is not None:
            if got != self.spec.host_key_fingerprint:
                raise HostKeyError(
                    f"destination '{self.name}': host key of {self.spec.host}:{self.spec.port} is {got}, "
                    f"not the pinned {self.spec.host_key_fingerprint}: refusing to connect")
            return
        host = self.spec.host if self.spec.port == 22 else f"[{self.spec.host}]:{self.spec.port}"
        try:
            known = paramiko.HostKeys(str(self.spec.known_hosts))
        except OSError as exc:
            raise BackupdError(f"destination '{self.name}': cannot read known_hosts "
                               f"{self.spec.known_hosts}: {exc.strerror}") from None
        entry = known.lookup(host)
        if entry is None or key.get_name() not in entry:
            raise HostKeyError(
                f"destination '{self.name}': host key {got} of {host} is not in {self.spec.known_hosts}: "
                "refusing to connect (add it after checking it out of band)")
        if entry[key.get_name()] != key:
            raise HostKeyError(
                f"destination '{self.name}': host key of {host} CHANGED (now {got}); refusing to connect")

    def _connect(self) -> paramiko.SFTPClient:
        sock = socket.create_connection((self.spec.host, self.spec.port), timeout=30)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=30)
            self._verify_host_key(transport.get_remote_server_key())
            if self.spec.key_file is not None:
                pkey = paramiko.PKey.from_path(str(self.spec.key_file))
                transport.auth_publickey(self.spec.user, pkey)
            else:
                assert self.spec.password is not None
                transport.auth_password(self.spec.user, self.spec.password.get_secret_value())
            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
        except BaseException:
            transport.close()
            raise
        self._transport = transport
        return sftp

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None or self._transport is None or not self._transport.is_active():
            try:
                self._sftp = retry(self._connect, is_transient=_transient,
                                   what=f"{self.name}: connect to {self.spec.host}:{self.spec.port}")
            except HostKeyError:
                raise
            except paramiko.AuthenticationException:
                raise BackupdError(f"destination '{self.name}': authentication as '{self.spec.user}' "
                                   f"to {self.spec.host}:{self.spec.port} failed") from None
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise BackupdError(f"destination '{self.name}': cannot connect to "
                                   f"{self.spec.host}:{self.spec.port}: {exc}") from None
        return self._sftp

    def host_key(self) -> paramiko.PKey:
        """The server's host key, verified as for every connection (known_hosts or the pinned
        fingerprint): what another SSH client may be told to trust, and nothing else."""
        self.sftp()
        assert self._transport is not None
        return self._transport.get_remote_server_key()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._sftp = self._transport = None

    # ------------------------------------------------------------ operations

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, check_key(key))

    def _makedirs(self, path: str) -> None:
        sftp = self.sftp()
        parts, current = path.split("/"), ""
        for part in parts:
            current = f"{current}/{part}" if current or path.startswith("/") else part
            if not part:
                continue
            try:
                sftp.stat(current)
            except FileNotFoundError:
                sftp.mkdir(current)

    def open_upload(self, key: str) -> Upload:
        final = self._path(key)
        try:
            self._makedirs(posixpath.dirname(final))
            return SftpUpload(self, final)
        except OSError as exc:
            raise BackupdError(f"destination '{self.name}': cannot write {key}: {exc}") from None

    def open_read(self, key: str) -> BinaryIO:
        try:
            handle = self.sftp().open(self._path(key), "rb")
            size = handle.stat().st_size or 0
        except FileNotFoundError:
            raise NotFoundError(f"destination '{self.name}': '{key}' does not exist") from None
        except OSError as exc:
            raise BackupdError(f"destination '{self.name}': cannot read {key}: {exc}") from None
        return windowed_read(handle, size)  # type: ignore[return-value]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        sftp = self.sftp()
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                entries = sftp.listdir_attr(posixpath.join(self.root, rel) if rel else self.root)
            except FileNotFoundError:
                continue
            for attr in sorted(entries, key=lambda a: a.filename):
                child = posixpath.join(rel, attr.filename) if rel else attr.filename
                if stat.S_ISDIR(attr.st_mode or 0):
                    stack.append(child)
                elif PARTIAL_MARK not in attr.filename and child.startswith(prefix):
                    yield ObjectInfo(child, attr.st_size or 0,
                                     datetime.fromtimestamp(attr.st_mtime or 0, timezone.utc))

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            attr = self.sftp().stat(self._path(key))
        except FileNotFoundError:
            return None
        return ObjectInfo(key, attr.st_size or 0, datetime.fromtimestamp(attr.st_mtime or 0, timezone.utc))

    def delete(self, key: str) -> None:
        try:
            self.sftp().remove(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackupdError(f"destination '{self.name}': cannot delete {key}: {exc}") from None


def windowed_read(handle: paramiko.SFTPFile, size: int, window: int = READ_WINDOW) -> ChunkReader:
    """A remote file read with pipelined requests, one window ahead at most.

    paramiko's prefetch() of a whole file keeps every block that arrives in memory
    until it is read, so a slow consumer (a restore) would hold the whole archive;
    reading window by window keeps the pipelining and bounds memory to one window.
    """
    def chunks() -> Iterator[bytes]:
        for start in range(0, size, window):
            end = min(size, start + window)
            yield from handle.readv([(o, min(CHUNK, end - o)) for o in range(start, end, CHUNK)])

    return ChunkReader(chunks(), handle.close)


class SftpUpload(Upload):
    def __init__(self, store: SftpStore, final: str) -> None:
        self.store = store
        self.final = final
        directory, name = posixpath.split(final)
        self.temp = posixpath.join(directory, f".{name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
        self.handle = store.sftp().open(self.temp, "wb")
        self.handle.set_pipelined(True)

    def write(self, data: bytes) -> None:
        self.handle.write(data)

    def commit(self) -> None:
        sftp = self.store.sftp()
        self.handle.close()
        try:
            sftp.stat(self.final)
            sftp.remove(self.temp)
            raise BackupdError(f"destination '{self.store.name}': refusing to overwrite {self.final}")
        except FileNotFoundError:
            pass
        sftp.posix_rename(self.temp, self.final)

    def abort(self) -> None:
        try:
            self.handle.close()
        except Exception:  # noqa: BLE001 - the connection may be what failed
            pass
        try:
            self.store.sftp().remove(self.temp)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: could not remove partial upload %s: %s", self.store.name, self.temp, exc)
