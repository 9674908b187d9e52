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
