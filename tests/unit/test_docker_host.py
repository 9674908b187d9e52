"""Sending into an attach stream: it must never block forever on a helper that has exited."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

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


# ------------------------------------------------------------------ the named-pipe directory


class _Me:
    """backupd's own container, as the engine describes it: the state volume at STATE_DIR."""

    def __init__(self, state_dir: str) -> None:
        self.attrs = {"Mounts": [{"Type": "volume", "Name": "state", "Destination": state_dir, "RW": True}]}


OWNER, OTHER = "a" * 32, "b" * 32  # catalog owner ids, as identity.this_process makes them


def _host(monkeypatch, me=None, owner: str = OWNER):
    from backupd import docker_host

    host = docker_host.DockerHost.__new__(docker_host.DockerHost)
    host._fifo_dir = None
    host.owner = owner
    monkeypatch.setattr(host, "own_container", lambda: me, raising=False)
    monkeypatch.setattr(docker_host, "in_container", lambda: False)
    monkeypatch.delenv("BACKUPD_TRANSFER", raising=False)
    return host


def test_on_the_host_the_pipe_directory_is_fresh_and_private_never_one_found_in_tmp(tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"backupd-fifo-{os.getuid()}"  # the name older versions used as found
    planted.mkdir()
    planted.chmod(0o777)
    fifo_dir = _host(monkeypatch).fifo_dir()
    assert fifo_dir.local.parent == tmp_path and fifo_dir.local != planted
    st = os.lstat(fifo_dir.local)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    assert fifo_dir.mount["Source"] == str(fifo_dir.local)


def test_two_backupds_on_one_host_get_different_pipe_directories(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert _host(monkeypatch).fifo_dir().local != _host(monkeypatch).fifo_dir().local


def test_in_the_sidecar_an_unsafe_pipe_directory_in_the_state_volume_is_refused(tmp_path, monkeypatch):
    import pytest

    from backupd import docker_host
    from backupd.private import UnsafePathError

    monkeypatch.setattr(docker_host, "STATE_DIR", str(tmp_path))
    (tmp_path / ".fifo").mkdir()
    (tmp_path / ".fifo").chmod(0o777)
    with pytest.raises(UnsafePathError, match=rf"the named-pipe directory {tmp_path}/.fifo has mode 0777"):
        _host(monkeypatch, _Me(str(tmp_path))).fifo_dir()


def test_in_the_sidecar_the_pipe_directory_is_made_0700_in_the_state_volume(tmp_path, monkeypatch):
    import os
    import stat

    from backupd import docker_host

    monkeypatch.setattr(docker_host, "STATE_DIR", str(tmp_path))
    old = os.umask(0o022)
    try:
        fifo_dir = _host(monkeypatch, _Me(str(tmp_path))).fifo_dir()
    finally:
        os.umask(old)
    assert fifo_dir.local == tmp_path / ".fifo" and fifo_dir.inside == "/backupd-fifo/.fifo"
    assert stat.S_IMODE(os.lstat(fifo_dir.local).st_mode) == 0o700


def test_recovery_removes_the_pipes_and_pipe_directories_a_killed_backupd_left_and_nothing_else(
        tmp_path, monkeypatch):
    import os
    import tempfile

    from backupd.docker_host import _fifo, remove_dead_pipes

    temp, state = tmp_path / "tmp", tmp_path / "state"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # Made as a backupd makes them: the dead one's host directory with its pipe left open...
    # (Their hosts are kept: a host's directory goes with it when a process ends normally.)
    hosts = [_host(monkeypatch, owner=OWNER), _host(monkeypatch, owner=OTHER)]
    dead, live = (host.fifo_dir() for host in hosts)
    _fifo(dead, OWNER).__enter__()  # never left: the process was killed inside
    # ...and the pipes in the sidecar's state volume, with what else may lie about.
    state.mkdir()
    for name in (f"{OWNER}-1.tar", f"{OTHER}-2.tar"):
        os.mkfifo(state / name)
    (state / f"{OWNER}-3.tar").write_bytes(b"not a pipe")
    (temp / "backupd-fifo-0").mkdir()  # an older version's name: no owner to judge
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (temp / f"backupd-fifo-{OWNER}-link").symlink_to(elsewhere)  # never followed
    (temp / f"backupd-fifo-{OWNER}-file").write_text("")

    removed = remove_dead_pipes(lambda owner: owner == OWNER, state_pipes=state)

    assert removed == 2
    assert not dead.local.exists() and live.local.is_dir()
    assert sorted(p.name for p in state.iterdir()) == [f"{OWNER}-3.tar", f"{OTHER}-2.tar"]
    assert sorted(p.name for p in temp.iterdir()) == sorted(
        ["backupd-fifo-0", f"backupd-fifo-{OWNER}-link", f"backupd-fifo-{OWNER}-file", live.local.name])
    assert elsewhere.is_dir()


# ------------------------------------------------------------------ the helper image's tar


class _Images:
    def get(self, name):
        return name


def _image_host(monkeypatch, says):
    from types import SimpleNamespace

    from backupd import docker_host

    host = docker_host.DockerHost(SimpleNamespace(api=None, images=_Images()), "helper:x")
    ran: list[list[str]] = []

    def run_helper(command, mounts, purpose):
        ran.append(command)
        if isinstance(says, Exception):
            raise says
        return says

    monkeypatch.setattr(host, "run_helper", run_helper)
    return host, ran


def test_the_helper_image_is_asked_for_gnu_tar_once_per_image(monkeypatch):
    host, ran = _image_host(monkeypatch, "tar (GNU tar) 1.34\nCopyright ...\n")
    host.check_helper_image()
    host.check_helper_image()
    assert ran == [["tar", "--version"]]


def test_a_busybox_tar_is_a_config_error_naming_the_image_and_what_to_build(monkeypatch):
    import pytest

    from backupd.errors import ConfigError

    host, _ = _image_host(monkeypatch, "tar (busybox) 1.35.0\n")
    with pytest.raises(ConfigError) as refused:
        host.check_helper_image()
    message = str(refused.value)
    assert message.startswith("helper_image: image 'helper:x' has no GNU tar (`tar --version` says: tar (busybox) 1.35.0)")
    assert "FROM debian:bookworm-slim" in message and refused.value.exit_code == 2


def test_an_image_without_tar_is_a_config_error_with_the_engines_reason(monkeypatch):
    import pytest
    from docker.errors import APIError

    from backupd.errors import ConfigError

    host, _ = _image_host(monkeypatch, APIError("400", explanation='exec: "tar": executable file not found in $PATH'))
    with pytest.raises(ConfigError, match=r"has no GNU tar \(`tar --version` cannot run: exec: \"tar\": executable"):
        host.check_helper_image()


def test_a_helpers_error_keeps_the_end_of_its_stderr_with_room_for_long_paths() -> None:
    """ssh's "Host key verification failed" came after restic's long repository path and was
    cut off when only 500 characters were kept."""
    from backupd.docker_host import STDERR_KEPT, exited

    stderr = "Fatal: unable to open repo at sftp:u@h:/" + "p" * 1500 + "\nHost key verification failed."
    error = exited("helper for backup", 1, stderr)
    assert str(error).endswith("Host key verification failed.") and "Fatal: unable to open repo" in str(error)
    assert len(str(exited("x", 1, "e" * 10 * STDERR_KEPT))) < STDERR_KEPT + 50
    assert str(exited("x", 2, "")) == "x exited 2: no message"


# ------------------------------------------------------------------ a helper's exit status over attach


class _ExitsOne:
    """An engine whose helper writes some stdout and a line of stderr over attach, then exits 1
    (what GNU tar does when a file changed while it read it)."""

    def attach_socket(self, cid: str, params: dict) -> Any:
        ours, engine = socket.socketpair()

        def frame(stream: int, data: bytes) -> bytes:
            return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

        engine.sendall(frame(1, b"archive bytes") + frame(2, b"tar: ./log: file changed as we read it\n"))
        engine.close()
        return ours.makefile("rb", buffering=0)  # a raw SocketIO, as docker-py's attach gives

    def start(self, cid: str) -> None:
        pass

    def wait(self, cid: str, timeout: float | None = None) -> dict:
        return {"StatusCode": 1}


def _attach_host(monkeypatch):
    host = _host(monkeypatch)
    monkeypatch.setenv("BACKUPD_TRANSFER", "attach")
    host.api = _ExitsOne()
    monkeypatch.setattr(host, "_create_helper", lambda *args, **kw: "cid", raising=False)
    monkeypatch.setattr(host, "_remove", lambda cid: None, raising=False)
    return host


def test_a_tar_that_exits_1_over_attach_is_whole_with_a_warning_but_any_other_helper_fails(monkeypatch, caplog):
    import pytest

    from backupd.docker_host import HelperError, VolumeSource

    host = _attach_host(monkeypatch)
    with host.tar_stream(VolumeSource("v", "volume", "v", "jobs.j.volumes[0]")) as chunks:
        assert b"".join(chunks) == b"archive bytes"
    assert "files changed while being read" in caplog.text and "file changed as we read it" in caplog.text
    with pytest.raises(HelperError, match="helper for restic dump exited 1: tar: ./log: file changed"):
        with host.helper_output(["restic", "dump"], [], "restic dump") as chunks:
            b"".join(chunks)


# ------------------------------------------------------------------ an interrupt while a helper is created


class _Engine:
    """Creates and removes containers by name; a SIGTERM arrives while it is creating."""

    def __init__(self) -> None:
        self.containers: set[str] = set()

    def create_host_config(self, **kwargs: Any) -> dict:
        return {}

    def create_container(self, image: str, name: str, **kwargs: Any) -> dict:
        import signal

        created = threading.Event()

        def engine() -> None:  # finishes creating it whatever the client does meanwhile
            time.sleep(0.05)
            self.containers.add(name)
            created.set()

        threading.Thread(target=engine).start()
        signal.raise_signal(signal.SIGTERM)  # lands while the client waits for the answer
        created.wait(5)
        return {"Id": name}

    def remove_container(self, cid: str, **kwargs: Any) -> None:
        from docker.errors import NotFound

        if cid not in self.containers:
            raise NotFound("no such container")
        self.containers.discard(cid)


def test_a_sigterm_while_the_engine_creates_a_helper_is_raised_once_it_exists_and_it_is_removed(monkeypatch):
    """Interrupted mid-request, the remove by name used to reach the engine before the create
    had finished, and the helper was left behind (seen after a SIGTERM at start-up)."""
    import signal

    import pytest

    from backupd import interrupts

    host = _host(monkeypatch)
    host.api = engine = _Engine()
    host._helper_image, host.owner, host.helper_memory = "backupd-helper:test", "me", None
    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            host._create_helper(["tar", "--version"], [], purpose="the GNU tar check")
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
    time.sleep(0.2)  # an engine still creating it would be done by now
    assert engine.containers == set()
