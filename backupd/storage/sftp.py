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
from typing import BinaryIO, Iterator, Sequence

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, SFTPError

from backupd.config import SftpDestination
from backupd.errors import BackupdError, NotFoundError
from backupd.retry import retry
from backupd.storage.base import (PARTIAL_MARK, REPOSITORY_ROOT, ChunkReader, Leftover, ObjectInfo, Store, Upload,
                                  check_key, is_partial)
from backupd.stream import CHUNK

log = logging.getLogger(__name__)
READ_WINDOW = 8 * CHUNK  # bytes requested ahead while reading: the memory bound of a read
READ_SPAN = 256 * CHUNK  # bytes of a file handed to paramiko's readv at once
# Large requests and AES-GCM: paramiko spends its time per request and per packet in Python,
# so fewer, larger requests (where the server says it takes them) and one cipher call per
# packet instead of a cipher and a MAC are what make it fast.
REQUEST_SIZE = 32 * 1024  # what every SFTP server takes (paramiko's default)
MAX_REQUEST_SIZE = 256 * 1024  # the most asked of a server that announces larger limits
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
TRANSPORT_WINDOW = 16 << 20  # how far a server may send ahead of a read (SSH flow control)


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
        self.read_size = self.write_size = REQUEST_SIZE  # per request, once the server told its limits

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
        transport = paramiko.Transport(sock, default_window_size=TRANSPORT_WINDOW)
        options = transport.get_security_options()
        options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in options.ciphers) + tuple(
            c for c in options.ciphers if c not in PREFERRED_CIPHERS)
        try:
            transport.start_client(timeout=30)
            self._verify_host_key(transport.get_remote_server_key())
            if self.spec.key_file is not None:
                pkey = paramiko.PKey.from_path(str(self.spec.key_file))
                transport.auth_publickey(self.spec.user, pkey)
            else:
                assert self.spec.password is not None
                transport.auth_password(self.spec.user, self.spec.password.get_secret_value())
            sftp = paramiko.SFTPClient.from_transport(transport, window_size=TRANSPORT_WINDOW)
            assert sftp is not None
            self.read_size, self.write_size = request_sizes(sftp)
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
        return windowed_read(handle, size, request=self.read_size)  # type: ignore[return-value]

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

    def leftovers(self) -> Iterator[Leftover]:
        for job in self._subdirs(self.root):
            if job == REPOSITORY_ROOT:
                continue  # restic's, not backupd's layout
            for backup in self._subdirs(posixpath.join(self.root, job)):
                for attr in self._listdir(posixpath.join(self.root, job, backup)):
                    if is_partial(attr.filename) and stat.S_ISREG(attr.st_mode or 0):
                        yield Leftover(f"{job}/{backup}/{attr.filename}", attr.st_size or 0,
                                       datetime.fromtimestamp(attr.st_mtime or 0, timezone.utc))

    def remove_leftover(self, leftover: Leftover) -> None:
        if not is_partial(leftover.key.rsplit("/", 1)[-1]):
            raise ValueError(f"'{leftover.key}' is not a partial upload")
        self.delete(leftover.key)

    def _listdir(self, path: str) -> Sequence[paramiko.SFTPAttributes]:
        try:
            return sorted(self.sftp().listdir_attr(path), key=lambda a: a.filename)
        except FileNotFoundError:  # removed meanwhile (prune)
            return []
        except OSError as exc:
            raise BackupdError(f"destination '{self.name}': cannot list {path}: {exc}") from None

    def _subdirs(self, path: str) -> Sequence[str]:
        """Directories in `path` (links are not followed: nothing outside is ours)."""
        return [a.filename for a in self._listdir(path) if stat.S_ISDIR(a.st_mode or 0)]

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


def request_sizes(sftp: paramiko.SFTPClient) -> tuple[int, int]:
    """(read, write) bytes per request: what the server announces (OpenSSH's limits@openssh.com,
    which its own sftp client asks for too) up to MAX_REQUEST_SIZE, else REQUEST_SIZE."""
    try:
        # paramiko has no call for extensions but posix-rename; _request is how it sends them.
        kind, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
    except (OSError, EOFError, paramiko.SSHException, SFTPError):
        return REQUEST_SIZE, REQUEST_SIZE  # an older or another server: the size every server takes
    if kind != CMD_EXTENDED_REPLY:
        return REQUEST_SIZE, REQUEST_SIZE
    msg.get_int64()  # max packet length
    read, write = msg.get_int64(), msg.get_int64()  # 0: not announced

    def size(limit: int) -> int:
        return min(limit, MAX_REQUEST_SIZE) if limit >= REQUEST_SIZE else REQUEST_SIZE

    return size(read), size(write)


def windowed_read(handle: paramiko.SFTPFile, size: int, ahead: int = READ_WINDOW,
                  request: int = REQUEST_SIZE, span: int = READ_SPAN) -> ChunkReader:
    """A remote file read with pipelined requests, at most `ahead` bytes requested and unread.

    Read requests go out ahead of the reader, bounded: paramiko counts a request as
    outstanding until its answer is read, and the SSH window holds back what the server
    sends until then, so a slow consumer (a restore) never pulls the archive into memory.
    The file is handed to paramiko `span` bytes at a time (it keeps a list of every
    request of a call), with one round trip between spans.
    """
    handle.MAX_REQUEST_SIZE = request  # paramiko splits reads into requests of this size
    most = max(1, ahead // request)

    def chunks() -> Iterator[bytes]:
        for start in range(0, size, span):
            end = min(size, start + span)
            yield from handle.readv([(o, min(CHUNK, end - o)) for o in range(start, end, CHUNK)],
                                    max_concurrent_prefetch_requests=most)

    return ChunkReader(chunks(), handle.close)


class SftpUpload(Upload):
    def __init__(self, store: SftpStore, final: str) -> None:
        self.store = store
        self.final = final
        directory, name = posixpath.split(final)
        self.temp = posixpath.join(directory, f".{name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
        self.handle = store.sftp().open(self.temp, "wb", bufsize=0)  # written as given: no copy
        self.handle.set_pipelined(True)
        # paramiko splits writes into requests of at most MAX_REQUEST_SIZE (a class constant).
        self.handle.MAX_REQUEST_SIZE = store.write_size

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
