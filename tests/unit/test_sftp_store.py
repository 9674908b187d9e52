"""SFTP store pieces that need no server: host key decisions and bounded reads."""

from __future__ import annotations

import os
from pathlib import Path

import paramiko
import pytest

from backupd.config import SftpDestination
from backupd.storage.sftp import HostKeyError, SftpStore, windowed_read, fingerprint


def spec(tmp_path: Path, **extra) -> SftpDestination:
    (tmp_path / "id").write_text("unused")
    return SftpDestination(type="sftp", host="backup.example", port=2222, user="u",
                           key_file=tmp_path / "id", **extra)


def host_key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def known_hosts(tmp_path: Path, key: paramiko.PKey, host: str = "[backup.example]:2222") -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(f"{host} {key.get_name()} {key.get_base64()}\n")
    return path


def test_key_listed_in_known_hosts_is_accepted(tmp_path):
    key = host_key()
    SftpStore("off", spec(tmp_path, known_hosts=known_hosts(tmp_path, key)))._verify_host_key(key)


def test_changed_key_is_refused_naming_the_destination(tmp_path):
    path = known_hosts(tmp_path, host_key())
    with pytest.raises(HostKeyError, match="destination 'off': host key of .* CHANGED .*refusing"):
        SftpStore("off", spec(tmp_path, known_hosts=path))._verify_host_key(host_key())


def test_unknown_host_is_refused_never_added(tmp_path):
    path = known_hosts(tmp_path, host_key(), host="[other.example]:2222")
    before = path.read_text()
    with pytest.raises(HostKeyError, match="is not in .*refusing to connect"):
        SftpStore("off", spec(tmp_path, known_hosts=path))._verify_host_key(host_key())
    assert path.read_text() == before


def test_pinned_fingerprint_must_match(tmp_path):
    key = host_key()
    SftpStore("off", spec(tmp_path, host_key_fingerprint=fingerprint(key)))._verify_host_key(key)
    with pytest.raises(HostKeyError, match="not the pinned"):
        SftpStore("off", spec(tmp_path, host_key_fingerprint=fingerprint(key)))._verify_host_key(host_key())


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path):
    import subprocess

    key = host_key()
    pub = tmp_path / "k.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()}\n")
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    assert fingerprint(key) == printed


class FakeHandle:
    def __init__(self, data: bytes):
        self.data, self.requests, self.closed = data, [], False
        self.MAX_REQUEST_SIZE = 32768

    def readv(self, chunks, max_concurrent_prefetch_requests=None):
        self.requests.append((sum(n for _, n in chunks), max_concurrent_prefetch_requests, self.MAX_REQUEST_SIZE))
        for offset, n in chunks:
            yield self.data[offset:offset + n]

    def close(self):
        self.closed = True


def test_reads_are_requested_ahead_within_a_bound_a_span_at_a_time():
    data = os.urandom(5 * 1024 * 1024 + 123)
    handle = FakeHandle(data)
    with windowed_read(handle, len(data), ahead=1024 * 1024, request=256 * 1024, span=2 * 1024 * 1024) as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    # 4 requests of 256 KiB outstanding at most: 1 MiB requested and unread
    assert handle.requests == [(2 * 1024 * 1024, 4, 256 * 1024), (2 * 1024 * 1024, 4, 256 * 1024),
                               (1024 * 1024 + 123, 4, 256 * 1024)]
    assert handle.closed


def test_empty_remote_file_reads_as_empty():
    handle = FakeHandle(b"")
    with windowed_read(handle, 0) as f:
        assert f.read() == b""


class FakeSftp:
    def __init__(self, reply):
        self.reply = reply

    def _request(self, kind, name):
        assert name == "limits@openssh.com"
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


def limits(packet: int, read: int, write: int):
    from paramiko.message import Message
    from paramiko.sftp import CMD_EXTENDED_REPLY

    msg = Message()
    for value in (packet, read, write, 64):
        msg.add_int64(value)
    msg.rewind()
    return CMD_EXTENDED_REPLY, msg


def test_request_sizes_follow_the_limits_the_server_announces():
    from backupd.storage.sftp import request_sizes

    assert request_sizes(FakeSftp(limits(262144, 261120, 261120))) == (261120, 261120)
    assert request_sizes(FakeSftp(limits(1 << 24, 1 << 24, 1 << 20))) == (256 * 1024, 256 * 1024)
    assert request_sizes(FakeSftp(limits(0, 0, 0))) == (32768, 32768)  # not announced
    assert request_sizes(FakeSftp(OSError("Operation unsupported"))) == (32768, 32768)  # not OpenSSH
