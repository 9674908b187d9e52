"""Sending into an attach stream: it must never block forever on a helper that has exited."""

from __future__ import annotations

import socket
import threading
import time

from backupd.docker_host import _hang_up, _send


def test_send_delivers_everything_to_a_reader():
    a, b = socket.socketpair()
    data = bytes(range(256)) * 20_000  # 5 MB: more than the socket buffers hold
    got = bytearray()

    def read() -> None:
        while piece := b.recv(1 << 16):
            got.extend(piece)

    reader = threading.Thread(target=read)
    reader.start()
    assert _send(a, data, gone=lambda: False)
    a.close()
    reader.join(5)
    assert bytes(got) == data


def test_send_gives_up_when_the_receiver_is_gone_but_never_reads():
    a, b = socket.socketpair()  # b is never read, never closed: what the engine does after tar exits
    exited = threading.Event()
    threading.Timer(0.3, exited.set).start()
    start = time.monotonic()
    assert _send(a, bytes(8 << 20), gone=exited.is_set) is False
    assert time.monotonic() - start < 3
    b.close()


def test_send_reports_a_closed_receiver():
    a, b = socket.socketpair()
    b.close()
    assert _send(a, b"x" * (1 << 20), gone=lambda: False) is False


def test_hang_up_ends_the_connection_even_while_another_file_object_holds_it():
    a, b = socket.socketpair()
    held = a.makefile("rb")  # what docker-py's response keeps open
    _hang_up(a)
    assert b.recv(1) == b""  # the peer sees the end
    held.close()


def _imports_after_docker_host(docker_host_env: str | None) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    if docker_host_env is not None:
        env["DOCKER_HOST"] = docker_host_env
    code = ("import sys, backupd.docker_host, docker.transport as t; "
            "print('paramiko' in sys.modules, hasattr(t, 'SSHHTTPAdapter'))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_docker_sdk_skips_its_ssh_transport_unless_the_engine_is_on_ssh():
    """paramiko (and cryptography) cost every command 0.1-0.3 s of start-up; only ssh:// engines need them."""
    assert _imports_after_docker_host(None) == "False False"
    assert _imports_after_docker_host("unix:///var/run/docker.sock") == "False False"
    assert _imports_after_docker_host("ssh://backup@engine-host") == "True True"
