"""Talking to the Docker engine: resolve volumes, run helper containers, stream tar.

A helper container mounts one volume (read-only for backups) and runs GNU tar;
its stdout is the archive. backupd attaches before starting it so no byte is
missed, demultiplexes Docker's 8-byte frame headers itself with large reads,
and keeps the last stderr lines for error messages.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount

from backupd.config import VolumeSelector
from backupd.errors import BackupdError, ConfigError, NotFoundError

log = logging.getLogger(__name__)

MOUNT_POINT = "/data"
HELPER_LABEL = "backupd.helper"
STDERR_KEEP = 16 * 1024
# GNU tar flags that keep what a volume holds: numeric owners (the helper has no
# /etc/passwd to map names), sparse files, sub-second mtimes (POSIX format).
TAR_CREATE = ["tar", "--create", "--file=-", "--directory", MOUNT_POINT, "--numeric-owner",
              "--sparse", "--format=posix", "--blocking-factor=128", "."]
TAR_EXTRACT = ["tar", "--extract", "--file=-", "--directory", MOUNT_POINT, "--numeric-owner",
               "--same-owner", "--same-permissions", "--blocking-factor=128"]


class HelperError(BackupdError):
    """A helper container failed; the message carries its exit code and stderr."""


@dataclass(frozen=True)
class VolumeSource:
    """Something to archive: a named volume or a host path, and its artifact name."""

    name: str  # artifact name, unique within a job
    kind: str  # "volume" or "bind"
    source: str  # volume name or host path
    where: str  # config key path that selected it, for messages

    def mount(self, read_only: bool = True) -> Mount:
        return Mount(MOUNT_POINT, self.source, type=self.kind, read_only=read_only)


def connect() -> docker.DockerClient:
    """The engine from DOCKER_HOST or the default socket, with a clear error if absent."""
    try:
        client = docker.from_env(timeout=300)
        client.ping()
        return client
    except DockerException as exc:
        raise BackupdError(
            f"cannot reach the Docker engine (is /var/run/docker.sock mounted?): {exc}"
        ) from None


def _slug(path: str) -> str:
    return "path" + re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rstrip("/") or "root")


class DockerHost:
    """The engine operations backupd needs, and nothing else."""

    def __init__(self, client: docker.DockerClient, helper_image: str | None) -> None:
        self.client = client
        self.api = client.api
        self._helper_image = helper_image

    # ------------------------------------------------------------ helper image

    @property
    def helper_image(self) -> str:
        """The configured image, else the image of the container backupd runs in."""
        if self._helper_image is None:
            self._helper_image = self._own_image()
        return self._helper_image

    def _own_image(self) -> str:
        try:
            me = self.client.containers.get(socket.gethostname())
            return me.attrs["Config"]["Image"]
        except (NotFound, APIError):
            raise ConfigError(
                "helper_image: not set, and backupd is not running in a container whose "
                "image it could reuse; set helper_image to an image with GNU tar"
            ) from None

    def check_helper_image(self) -> None:
        try:
            self.client.images.get(self.helper_image)
        except ImageNotFound:
            raise ConfigError(
                f"helper_image: image '{self.helper_image}' is not present on the Docker engine "
                "(build or pull it first)"
            ) from None

    # ------------------------------------------------------------ resolve

    def resolve_volumes(self, job: str, selectors: list[VolumeSelector]) -> list[VolumeSource]:
        """Turn a job's `volumes:` into concrete sources; unknown names fail here, before anything runs."""
        found: dict[str, VolumeSource] = {}
        for i, sel in enumerate(selectors):
            where = f"jobs.{job}.volumes[{i}]"
            for src in self._resolve_one(sel, where):
                prior = found.get(src.name)
                if prior is not None and (prior.kind, prior.source) != (src.kind, src.source):
                    raise ConfigError(
                        f"{where}: artifact name '{src.name}' is already used by {prior.where}; "
                        "give one of them another name with `as:`"
                    )
                found.setdefault(src.name, src)
        return list(found.values())

    def _resolve_one(self, sel: VolumeSelector, where: str) -> list[VolumeSource]:
        if sel.name is not None:
            try:
                self.client.volumes.get(sel.name)
            except NotFound:
                raise NotFoundError(f"{where}: volume '{sel.name}' does not exist") from None
            return [VolumeSource(sel.as_name or sel.name, "volume", sel.name, where)]
        if sel.label is not None or sel.compose_project is not None:
            label = sel.label or f"com.docker.compose.project={sel.compose_project}"
            names = sorted(v.name for v in self.client.volumes.list(filters={"label": label}))
            if not names:
                what = f"label '{sel.label}'" if sel.label else f"compose project '{sel.compose_project}'"
                raise NotFoundError(f"{where}: no volume matches {what}")
            return [VolumeSource(n, "volume", n, where) for n in names]
        if sel.container is not None:
            return self._container_mounts(sel.container, where)
        assert sel.path is not None
        self._check_host_path(sel.path, where)
        return [VolumeSource(sel.as_name or _slug(sel.path), "bind", sel.path, where)]

    def _container_mounts(self, name: str, where: str) -> list[VolumeSource]:
        try:
            attrs = self.client.containers.get(name).attrs
        except NotFound:
            raise NotFoundError(f"{where}: container '{name}' does not exist") from None
        sources = []
        for mount in attrs.get("Mounts", []):
            if mount["Type"] == "volume":
                sources.append(VolumeSource(mount["Name"], "volume", mount["Name"], where))
            elif mount["Type"] == "bind":
                if mount["Source"] == "/var/run/docker.sock":
                    continue
                sources.append(VolumeSource(_slug(mount["Source"]), "bind", mount["Source"], where))
            else:
                log.warning("%s: skipping %s mount %s of container %s (not persistent)",
                            where, mount["Type"], mount.get("Destination"), name)
        for target in (attrs.get("HostConfig", {}).get("Tmpfs") or {}):
            log.warning("%s: skipping tmpfs mount %s of container %s (not persistent)", where, target, name)
        if not sources:
            raise NotFoundError(f"{where}: container '{name}' mounts no volume or host path")
        return sources

    def _check_host_path(self, path: str, where: str) -> None:
        """Ask the engine (which sees the host, unlike a sidecar) whether the path exists."""
        try:
            probe = self.api.create_container(
                self.helper_image, command=["true"], labels={HELPER_LABEL: "probe"},
                host_config=self.api.create_host_config(
                    mounts=[Mount(MOUNT_POINT, path, type="bind", read_only=True)]),
            )
        except APIError as exc:
            raise NotFoundError(f"{where}: host path '{path}' cannot be mounted: {exc.explanation}") from None
        self.api.remove_container(probe["Id"], force=True)

    # ------------------------------------------------------------ helper containers

    def _create_helper(self, command: list[str], mounts: list[Mount], stdin: bool = False,
                       purpose: str = "") -> str:
        # Named up front: if we are interrupted while the engine creates it, we can still remove it.
        name = f"backupd-helper-{uuid.uuid4().hex[:12]}"
        try:
            created = self.api.create_container(
                self.helper_image,
                # The helper may be backupd's own image, whose ENTRYPOINT is backupd: override it.
                entrypoint=command[:1],
                command=command[1:],
                user="0:0",  # reads every file of the volume and restores owners, whatever the image's USER
                name=name,
                stdin_open=stdin,  # with detach=False this also sets StdinOnce
                detach=not stdin,
                network_disabled=True,
                labels={HELPER_LABEL: purpose or "1"},
                host_config=self.api.create_host_config(mounts=mounts),
            )
        except ImageNotFound:
            raise ConfigError(f"helper_image: image '{self.helper_image}' is not present on the Docker engine") from None
        except APIError as exc:
            raise HelperError(f"cannot create helper container for {purpose}: {exc.explanation}") from None
        except BaseException:
            self._remove(name)
            raise
        return created["Id"]

    def _remove(self, cid: str) -> None:
        try:
            self.api.remove_container(cid, force=True)
        except NotFound:
            pass
        except APIError as exc:
            log.warning("could not remove helper container %s: %s", cid[:12], exc)

    def remove_stale_helpers(self) -> int:
        """Helpers left by a killed backupd hold volumes busy; remove the ones not running.

        Running helpers may belong to another backupd process on this engine.
        """
        stale = [c for c in self.api.containers(all=True, filters={"label": HELPER_LABEL})
                 if c.get("State") != "running"]
        for c in stale:
            self._remove(c["Id"])
        return len(stale)

    def run_helper(self, command: list[str], mounts: list[Mount], purpose: str) -> str:
        """Run a short helper command to completion; return its stdout, raise on failure."""
        cid = self._create_helper(command, mounts, purpose=purpose)
        try:
            self.api.start(cid)
            code = self.api.wait(cid, timeout=600)["StatusCode"]
            out = self.api.logs(cid, stdout=True, stderr=False).decode("utf-8", "replace")
            if code != 0:
                err = self.api.logs(cid, stdout=False, stderr=True).decode("utf-8", "replace")
                raise HelperError(f"helper for {purpose} exited {code}: {err.strip()[-500:]}")
            return out
        finally:
            self._remove(cid)

    @contextmanager
    def tar_stream(self, source: VolumeSource) -> Iterator[Iterator[bytes]]:
        """Yield an iterator of tar bytes of the source; raise HelperError if tar fails.

        The caller must consume the iterator fully; the exit status is checked
        when it is exhausted, so a helper that dies mid-stream is an error.
        """
        purpose = f"{source.kind} '{source.source}'"
        cid = self._create_helper(TAR_CREATE, [source.mount(read_only=True)], purpose=purpose)
        stream = None
        try:
            sock = self.api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1})
            self.api.start(cid)
            stream = self._stdout_then_check(cid, sock, purpose)
            yield stream
        finally:
            if stream is not None:
                # Abandoned mid-stream (cancel): close the attach socket first, or the
                # engine's remove waits forever on a helper blocked writing to it.
                stream.close()
            self._remove(cid)

    def _stdout_then_check(self, cid: str, sock: Any, purpose: str) -> Iterator[bytes]:
        stderr = bytearray()
        reader = io.BufferedReader(sock, 1 << 20)
        try:
            yield from _demux(reader, stderr)
        finally:
            reader.close()
        code = self.api.wait(cid, timeout=600)["StatusCode"]
        message = bytes(stderr).decode("utf-8", "replace").strip()
        if code == 1:
            # GNU tar: "some files differ" (changed while read); the archive is whole.
            log.warning("tar of %s: files changed while being read: %s", purpose, message[-500:])
        elif code != 0:
            raise HelperError(f"helper for {purpose} exited {code}: {message[-500:] or 'no message'}")

    def tar_extract(self, volume: str, chunks: Iterable[bytes], purpose: str) -> None:
        """Feed a tar stream into a helper that extracts it into the volume."""
        mount = Mount(MOUNT_POINT, volume, type="volume", read_only=False)
        cid = self._create_helper(TAR_EXTRACT, [mount], stdin=True, purpose=purpose)
        try:
            sock = self.api.attach_socket(
                cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            raw = getattr(sock, "_sock", sock)
            self.api.start(cid)
            output = bytearray()
            reader = threading.Thread(target=_drain, args=(sock, output), daemon=True)
            reader.start()
            broken: OSError | None = None
            try:
                for chunk in chunks:
                    raw.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError) as exc:
                broken = exc  # tar exited early; its stderr says why
            finally:
                try:
                    raw.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            code = self.api.wait(cid, timeout=600)["StatusCode"]
            reader.join(timeout=10)
            message = bytes(output[-STDERR_KEEP:]).decode("utf-8", "replace").strip()
            if code != 0 or broken:
                raise HelperError(f"restore helper for {purpose} exited {code}: {message[-500:] or broken}")
        finally:
            self._remove(cid)

    # ------------------------------------------------------------ volumes

    def volume_exists(self, name: str) -> bool:
        try:
            self.client.volumes.get(name)
            return True
        except NotFound:
            return False

    def create_volume(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.client.volumes.create(name, labels=labels or {})

    def remove_volume(self, name: str) -> None:
        try:
            self.client.volumes.get(name).remove(force=True)
        except NotFound:
            pass

    def volume_is_empty(self, name: str) -> bool:
        out = self.run_helper(["find", MOUNT_POINT, "-mindepth", "1", "-maxdepth", "1"],
                              [Mount(MOUNT_POINT, name, type="volume", read_only=True)],
                              purpose=f"volume '{name}'")
        return not out.strip()

    def clear_volume(self, name: str) -> None:
        self.run_helper(["find", MOUNT_POINT, "-mindepth", "1", "-maxdepth", "1", "-exec", "rm", "-rf", "{}", "+"],
                        [Mount(MOUNT_POINT, name, type="volume", read_only=False)],
                        purpose=f"volume '{name}'")

    def running_containers_using(self, volume: str) -> list[Any]:
        return [c for c in self.client.containers.list(filters={"volume": volume})
                if c.labels.get(HELPER_LABEL) is None]


def _demux(reader: io.BufferedReader, stderr: bytearray) -> Iterator[bytes]:
    """Split Docker's multiplexed attach stream: yield stdout, keep stderr's tail."""
    while True:
        header = reader.read(8)
        if len(header) < 8:
            return
        length = int.from_bytes(header[4:8], "big")
        payload = reader.read(length)
        if header[0] == 2:
            stderr.extend(payload)
            del stderr[:-STDERR_KEEP]
        elif payload:
            yield payload
        if len(payload) < length:
            return


def _drain(sock: Any, keep: bytearray) -> None:
    """Read a helper's stdout and stderr until it closes, keeping the tail of both."""
    for payload in _demux(io.BufferedReader(sock, 65536), keep):
        keep.extend(payload)
        del keep[:-STDERR_KEEP]


def stop_and_start(containers: list[Any], action: Callable[[], None]) -> None:
    """Stop containers, run action, start them again whatever happens."""
    stopped = []
    try:
        for c in containers:
            log.info("stopping container %s", c.name)
            c.stop()
            stopped.append(c)
        action()
    finally:
        for c in reversed(stopped):
            log.info("starting container %s", c.name)
            try:
                c.start()
            except DockerException as exc:
                log.error("could not start container %s again: %s", c.name, exc)
