"""Helpers get least privilege: no network, no new privileges, every capability dropped but
the few their command needs. The real engine's view of it is in tests/integration/test_volumes.py."""

from __future__ import annotations

import stat
from pathlib import Path

import docker
import pytest
from docker.types import Mount

from backupd.docker_host import (CLEAR_CAPS, FIFO_POINT, READ_CAPS, DockerHost, FifoDir, HelperError,
                                 VolumeSource)


class FakeApi:
    """Records create_container's arguments; builds host configs as the SDK does."""

    def __init__(self) -> None:
        self.created: list[dict] = []

    def create_host_config(self, **kwargs):
        return docker.types.HostConfig(version="1.44", **kwargs)

    def create_container(self, image, **kwargs):
        self.created.append(kwargs)
        return {"Id": f"c{len(self.created)}"}

    def attach_socket(self, *args, **kwargs):
        raise HelperError("stop here: the helper was created")

    def remove_container(self, *args, **kwargs):
        pass


class FakeClient:
    def __init__(self) -> None:
        self.api = FakeApi()


@pytest.fixture(params=["attach", "pipe"])
def host(request, tmp_path: Path) -> DockerHost:
    host = DockerHost(FakeClient(), "helper:test")  # type: ignore[arg-type]
    host._fifo_dir = (FifoDir(tmp_path, Mount(FIFO_POINT, str(tmp_path), type="bind", read_only=True), FIFO_POINT)
                      if request.param == "pipe" else False)  # type: ignore[assignment]
    return host


def created(host: DockerHost) -> dict:
    [kwargs] = host.api.created
    return kwargs


def test_every_helper_has_no_network_no_new_privileges_and_drops_every_capability(host):
    host._create_helper(["true"], [], purpose="test")
    kwargs = created(host)
    assert kwargs["network_disabled"] is True
    assert kwargs["host_config"]["CapDrop"] == ["ALL"] and "CapAdd" not in kwargs["host_config"]
    assert kwargs["host_config"]["SecurityOpt"] == ["no-new-privileges"]


def test_a_backup_helper_only_reads(host):
    source = VolumeSource("v", "volume", "v", "jobs.j.volumes[0]")
    with pytest.raises(HelperError), host.tar_stream(source):
        pass
    config = created(host)["host_config"]
    assert config["CapAdd"] == ["DAC_READ_SEARCH"] and config["CapDrop"] == ["ALL"]
    assert all(m["ReadOnly"] for m in config["Mounts"])


def test_a_restore_helper_gets_what_tar_needs_to_restore_owners_and_modes_and_nothing_else(host):
    with pytest.raises(HelperError):
        host.tar_extract("v", iter([b""]), purpose="volume 'v'")
    config = created(host)["host_config"]
    assert sorted(config["CapAdd"]) == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP"]
    mounts = {m["Target"]: m["ReadOnly"] for m in config["Mounts"]}
    assert mounts.pop("/data") is False and all(mounts.values())  # the pipe's directory: read-only


def test_helpers_that_look_at_or_empty_a_volume_get_only_what_find_and_rm_need(host):
    with pytest.raises(HelperError):
        host.volume_is_empty("v")
    with pytest.raises(HelperError):
        host.clear_volume("v")
    looked, cleared = (kwargs["host_config"] for kwargs in host.api.created)
    assert looked["CapAdd"] == list(READ_CAPS) and looked["Mounts"][0]["ReadOnly"] is True
    assert cleared["CapAdd"] == list(CLEAR_CAPS)


def test_the_pipe_a_backup_helper_writes_is_writable_by_others_in_a_directory_only_backupd_enters(tmp_path):
    """The helper (uid 0 without DAC_OVERRIDE) is not the pipe's owner when backupd runs as
    uid 10001, as in its image; the 0700 directory keeps everyone else away from the pipe."""
    from backupd.docker_host import _fifo

    fifo_dir = FifoDir(tmp_path, Mount(FIFO_POINT, str(tmp_path), type="bind", read_only=True), FIFO_POINT)
    with _fifo(fifo_dir, "a" * 32, helper_writes=True) as (local, inside):
        assert stat.S_ISFIFO(local.stat().st_mode) and stat.S_IMODE(local.stat().st_mode) == 0o622
    with _fifo(fifo_dir, "a" * 32) as (local, inside):  # a restore helper reads it with DAC_OVERRIDE
        assert stat.S_IMODE(local.stat().st_mode) == 0o600
    assert not any(tmp_path.iterdir())
