"""Talking to the Docker engine: resolve volumes, run helper containers, stream tar.

A helper container mounts one volume (read-only for backups) and runs GNU tar;
its stdout is the archive. backupd attaches before starting it so no byte is
missed, demultiplexes Docker's 8-byte frame headers itself with large reads,
and keeps the last stderr lines for error messages.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import re
import select
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

# The Docker SDK loads its ssh:// transport, and with it paramiko and cryptography,
# whenever paramiko is installed (backupd has it for SFTP): 0.1 s of every command,
# 0.3 s from a cold page cache. Unless the engine is reached over ssh://, the SDK
# is told the transport is absent (None in sys.modules makes its import fail) and
# takes its own path for that case. SFTP destinations import paramiko themselves.
if not os.environ.get("DOCKER_HOST", "").startswith("ssh://"):
    sys.modules.setdefault("docker.transport.sshconn", None)  # type: ignore[arg-type]

import docker  # noqa: E402
from docker.errors import APIError, DockerException, ImageNotFound, NotFound  # noqa: E402
from docker.types import LogConfig, Mount  # noqa: E402

from backupd.config import VolumeSelector
from backupd.errors import BackupdError, ConfigError, NotFoundError
from backupd.excludes import merged, tar_args
from backupd.interrupts import held
from backupd.private import private_dir

log = logging.getLogger(__name__)

MOUNT_POINT = "/data"
HELPER_LABEL = "backupd.helper"
OWNER_LABEL = "backupd.owner"  # hostname/process token of the backupd that made the helper
STDERR_KEEP = 16 * 1024
# GNU tar flags that keep what a volume holds: numeric owners (the helper has no
# /etc/passwd to map names), sparse files, sub-second mtimes (POSIX format), extended
# attributes, POSIX ACLs and SELinux labels (PAX records; nothing where the filesystem has none).
METADATA = ["--xattrs", "--acls", "--selinux"]
TAR_CREATE = ["tar", "--create", "--file=-", "--directory", MOUNT_POINT, "--numeric-owner",
              "--sparse", "--format=posix", *METADATA, "--blocking-factor=2048", "."]


def tar_create(exclude: Iterable[str] = ()) -> list[str]:
    """TAR_CREATE, leaving out what the patterns name (their options go before the `.` they apply to)."""
    return [*TAR_CREATE[:-1], *tar_args(exclude), TAR_CREATE[-1]]
# 1 MiB records: tar writes file contents in 1 MiB writes instead of 64 KiB ones (a 2 GiB
# unpack took 3.8 s instead of 4.2-4.8 s, measured); --read-full-records takes the
# pipe's short reads and an archive whose last record is short.
# Of the extended attributes tar would set only user.* by default; file capabilities are
# asked for too. ACLs are set by --acls and labels by --selinux, each from its own record
# (not from the system.* and security.selinux attributes tar also stores).
TAR_EXTRACT = ["tar", "--extract", "--file=-", "--directory", MOUNT_POINT, "--numeric-owner",
               "--same-owner", "--same-permissions", *METADATA, "--xattrs-include=user.*",
               "--xattrs-include=security.capability", "--blocking-factor=2048", "--read-full-records"]


# Least privilege, a second wall behind the tar guard: a helper runs as root (uid 0 owns
# nothing in a volume) but with every capability dropped except those its command needs,
# no network, and no-new-privileges (a setuid file in a volume gains it nothing).
# Reading: DAC_READ_SEARCH reads every file and directory whatever its mode and owner.
READ_CAPS = ("DAC_READ_SEARCH",)
# Restoring as GNU tar does with --same-owner --same-permissions: CHOWN sets owners;
# FOWNER sets modes, times, ACLs and xattrs of files it now does not own; FSETID keeps
# setuid/setgid bits through chown and sets setgid on files of other groups; DAC_OVERRIDE
# writes into directories the archive (or an emptied volume) made another user's;
# MKNOD restores device nodes (the engine's device cgroup still forbids opening them);
# SETFCAP restores file capabilities (security.capability).
RESTORE_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "SETFCAP")
# Emptying a volume: delete entries of any directory, sticky ones included.
CLEAR_CAPS = ("DAC_OVERRIDE", "FOWNER")
HELPER_SECURITY_OPT = ["no-new-privileges"]

STATE_DIR = "/var/lib/backupd"  # in the image: the catalog's volume, shared with helpers for pipes
FIFO_POINT = "/backupd-fifo"
# Where a fed helper's shell waits, at end of input, for backupd's word that the input is whole.
STDIN_GATE = "/tmp/backupd-input-complete"
PIPE_CHUNK = 1 << 20
# Smaller than a chunk on purpose: a 1 MiB chunk goes to the pipe as it is, only
# smaller pieces are gathered (a buffer of PIPE_CHUNK copied every byte once more).
PIPE_WRITE_BUFFER = 1 << 16


@dataclass(frozen=True)
class FifoDir:
    local: Path  # where backupd creates the pipe
    mount: Mount  # how a helper mounts it
    inside: str  # the same directory, as the helper sees it


class HelperError(BackupdError):
    """A helper container failed; the message carries its exit code and stderr."""


STDERR_KEPT = 2000  # characters of a helper's stderr its error keeps: the end, with room for long paths


def exited(what: str, code: int | None, stderr: str) -> HelperError:
    """The error of a helper that exited `code`, with the end of its stderr (where the cause is)."""
    return HelperError(f"{what} exited {code}: {stderr[-STDERR_KEPT:] or 'no message'}")


class HelperStartError(HelperError):
    """The engine could not start a helper's command (most often: its image lacks it)."""


@dataclass(frozen=True)
class VolumeSource:
    """Something to archive: a named volume or a host path, and its artifact name."""

    name: str  # artifact name, unique within a job
    kind: str  # "volume" or "bind"
    source: str  # volume name or host path
    where: str  # config key path that selected it, for messages
    exclude: tuple[str, ...] = ()  # normalized patterns anchored at its root (backupd.excludes)

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


def in_container() -> bool:
    return os.path.exists("/.dockerenv")


def _slug(path: str) -> str:
    return "path" + re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rstrip("/") or "root")


class DockerHost:
    """The engine operations backupd needs, and nothing else."""

    def __init__(self, client: docker.DockerClient, helper_image: str | None,
                 helper_memory: int | None = None, owner: str = "") -> None:
        self.client = client
        self.owner = owner  # the catalog owner id of this backupd, on every helper it makes
        self.api = client.api
        self._helper_image = helper_image
        self.helper_memory = helper_memory
        self._fifo_dir: FifoDir | None = None
        self._engine_id: str | None = None
        self._images_checked: set[str] = set()

    # ------------------------------------------------------------ helper image

    @property
    def helper_image(self) -> str:
        """The configured image, else the image of the container backupd runs in."""
        if self._helper_image is None:
            self._helper_image = self._own_image()
        return self._helper_image

    def own_container(self) -> Any | None:
        """The container backupd runs in, or None on the host (or if it cannot be found)."""
        if not in_container():
            return None
        candidates = [socket.gethostname()]
        try:
            with open("/proc/self/mountinfo") as f:  # works with host networking too
                candidates[:0] = re.findall(r"/containers/([0-9a-f]{64})/", f.read())[:1]
        except OSError:
            pass
        for candidate in candidates:
            try:
                return self.client.containers.get(candidate)
            except (NotFound, APIError):
                continue
        return None

    def _own_image(self) -> str:
        me = self.own_container()
        if me is None:
            raise ConfigError(
                "helper_image: not set, and backupd is not running in a container whose "
                "image it could reuse; set helper_image to an image with GNU tar"
            )
        return me.attrs["Config"]["Image"]

    def fifo_dir(self) -> "FifoDir | None":
        """A directory both backupd and a helper see, for a named pipe between them.

        A pipe moves the archive at kernel speed; Docker's attach stream is several
        times slower. On the host it is a fresh private temp dir (removed at exit)
        bind-mounted into the helper; in a container it is `.fifo` in the volume holding
        STATE_DIR, which must be backupd's own, mode 0700 (UnsafePathError otherwise).
        None (fall back to attach) when there is no such mount or BACKUPD_TRANSFER=attach.
        """
        if self._fifo_dir is None and os.environ.get("BACKUPD_TRANSFER") != "attach":
            self._fifo_dir = self._find_fifo_dir() or False  # type: ignore[assignment]
        return self._fifo_dir or None

    def _find_fifo_dir(self) -> "FifoDir | None":
        me = self.own_container()
        if me is None:
            # A fresh private directory, never a predictable name in a shared /tmp: another
            # user could have made that first (0777, or a link to a directory of theirs).
            # Named by its owner: when this process is killed, the next backupd's recovery
            # knows whose it was (remove_dead_pipes).
            local = Path(tempfile.mkdtemp(prefix=f"{FIFO_DIR_PREFIX}{self.owner}-"))
            weakref.finalize(self, shutil.rmtree, local, True)
            shared = FifoDir(local, Mount(FIFO_POINT, str(local), type="bind", read_only=True), FIFO_POINT)
            # In a container the engine does not know (e.g. the engine runs inside it too),
            # a bind mount of our temp dir works only if the engine sees our filesystem.
            if not in_container() or self._sees_our_files(shared):
                return shared
            log.info("the Docker engine does not see this container's files: "
                     "archives travel over the slower attach stream")
            return None
        for m in me.attrs.get("Mounts", []):
            dest = m.get("Destination", "")
            if m.get("Type") in ("volume", "bind") and m.get("RW") and \
                    (STATE_DIR == dest or STATE_DIR.startswith(dest.rstrip("/") + "/")):
                local = private_dir(Path(STATE_DIR) / ".fifo", "the named-pipe directory")
                inside = FIFO_POINT + "/" + str(local.relative_to(dest))
                source = m["Name"] if m["Type"] == "volume" else m["Source"]
                # Read-only: a helper opens the pipe (a FIFO takes writes on a read-only mount)
                # and can change nothing else there, such as the catalog beside it.
                return FifoDir(local, Mount(FIFO_POINT, source, type=m["Type"], read_only=True), inside)
        log.info("no volume is mounted at %s: archives travel over the slower attach stream", STATE_DIR)
        return None

    def _sees_our_files(self, fifo_dir: FifoDir) -> bool:
        """Ask a helper whether a file we just made in fifo_dir is there for it too."""
        probe = fifo_dir.local / f"probe-{uuid.uuid4().hex}"
        probe.touch()
        try:
            # tar only: the one tool every helper image is required to have.
            self.run_helper(["tar", "--create", "--file=/dev/null", "--directory", fifo_dir.inside, probe.name],
                            [fifo_dir.mount], purpose="the named-pipe probe", caps=READ_CAPS)
            return True
        except HelperError:
            return False
        finally:
            probe.unlink(missing_ok=True)

    def check_helper_image(self) -> None:
        """The helper image is there and has GNU tar; asked once per image, by running `tar --version`.

        A busybox or alpine image has a tar that lacks what backupd's archives need; without
        this check every backup failed with a helper that "exited without writing".
        """
        image = self.helper_image
        if image in self._images_checked:
            return
        try:
            self.client.images.get(image)
        except ImageNotFound:
            raise ConfigError(
                f"helper_image: image '{image}' is not present on the Docker engine "
                "(build or pull it first)"
            ) from None
        try:
            said = self.run_helper(["tar", "--version"], [], purpose=f"the GNU tar check of image '{image}'")
            found = f"`tar --version` says: {said.strip().splitlines()[0] if said.strip() else 'nothing'}"
        except HelperError as exc:
            said, found = "", str(exc)
        except APIError as exc:  # the engine cannot start it: most often no tar at all
            said, found = "", f"`tar --version` cannot run: {exc.explanation or exc}"
        if "GNU tar" not in said:
            raise ConfigError(
                f"helper_image: image '{image}' has no GNU tar ({found[:300]}); backups and restores need "
                "GNU tar (--sparse, --numeric-owner, --format=posix), which busybox and alpine images lack. "
                "Use backupd's own image, or build a minimal helper: a Dockerfile with the one line "
                "`FROM debian:bookworm-slim` is enough (README: \"A minimal helper image\")")
        self._images_checked.add(image)

    # ------------------------------------------------------------ resolve

    def resolve_volumes(self, job: str, selectors: list[VolumeSelector],
                        exclude: Iterable[str] = ()) -> list[VolumeSource]:
        """Turn a job's `volumes:` into concrete sources, each with the job's `exclude` patterns
        and its own; unknown names fail here, before anything runs."""
        found: dict[str, VolumeSource] = {}
        exclude = tuple(exclude)
        for i, sel in enumerate(selectors):
            where = f"jobs.{job}.volumes[{i}]"
            patterns = merged(exclude, sel.exclude)
            for src in self._resolve_one(sel, where):
                src = replace(src, exclude=patterns) if patterns else src
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
        self.api.remove_container(probe["Id"], force=True, v=True)

    # ------------------------------------------------------------ helper containers

    def _create_helper(self, command: list[str], mounts: list[Mount], stdin: bool = False,
                       purpose: str = "", caps: Iterable[str] = (), image: str | None = None,
                       environment: dict[str, str] | None = None, network: str | None = None,
                       hostname: str | None = None, tmpfs: dict[str, str] | None = None) -> str:
        """A helper container (not started) with only the capabilities `caps`; `tmpfs`: in-memory
        mounts (path: options) for files that must never reach a disk."""
        # Named up front, and an interrupt held until the engine has answered: the create is then
        # done, so removing it by name cannot race the engine still creating it.
        name = f"backupd-helper-{uuid.uuid4().hex[:12]}"
        try:
            with held():
                created = self.api.create_container(
                    image or self.helper_image,
                    # The helper may be backupd's own image, whose ENTRYPOINT is backupd: override it.
                    entrypoint=command[:1],
                    command=command[1:],
                    user="0:0",  # reads every file of the volume and restores owners, whatever the image's USER
                    name=name,
                    stdin_open=stdin,  # with detach=False this also sets StdinOnce
                    detach=not stdin,
                    network_disabled=network is None,  # only a helper that reaches a destination gets one
                    environment=environment,
                    hostname=hostname,
                    labels={HELPER_LABEL: purpose or "1", OWNER_LABEL: self.owner},
                    # No log driver: the archive must not be copied into the engine's logs on disk
                    # (json-file would stage every byte and cut throughput tenfold).
                    # The memory limit holds the helper's page cache too: a backup does not push the
                    # host's working set out of memory, and a restore's writes reach the disk as they
                    # go instead of all at once when the engine removes the container (cgroup exit
                    # flushes its dirty pages: about 1 s per 2 GiB restored, measured).
                    host_config=self.api.create_host_config(mounts=mounts, log_config=LogConfig(type="none"),
                                                            mem_limit=self.helper_memory, network_mode=network,
                                                            cap_drop=["ALL"], cap_add=list(caps) or None,
                                                            security_opt=HELPER_SECURITY_OPT, tmpfs=tmpfs),
                )
        except ImageNotFound:
            key = "repository_image" if image else "helper_image"
            raise ConfigError(f"{key}: image '{image or self.helper_image}' is not present on the Docker engine") from None
        except APIError as exc:
            raise HelperError(f"cannot create helper container for {purpose}: {exc.explanation}") from None
        except BaseException:
            self._remove(name)
            raise
        return created["Id"]

    def _remove(self, cid: str) -> None:
        try:
            # v: with the anonymous volumes the engine made for the image's VOLUMEs (backupd's
            # own image has two), or every helper leaves them behind. Named volumes are never removed.
            self.api.remove_container(cid, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            log.warning("could not remove helper container %s: %s", cid[:12], exc)

    def remove_helpers(self, whose: Callable[[str | None], bool]) -> int:
        """Remove the helpers whose owner (catalog owner id, None if unlabelled) `whose` picks.

        At start-up: those a killed backupd left, holding volumes busy (helpers of live processes,
        and of backupd installations with another catalog on the same engine, are left alone).
        At a cancel: this backupd's own, so runs blocked reading them unwind.
        """
        picked = [c for c in self.api.containers(all=True, filters={"label": HELPER_LABEL})
                  if whose((c.get("Labels") or {}).get(OWNER_LABEL) or None)]
        for c in picked:
            self._remove(c["Id"])
        return len(picked)

    def engine_id(self) -> str:
        """The engine's own id: held containers and helpers belong to one engine."""
        if self._engine_id is None:
            self._engine_id = str(self.client.info().get("ID") or "")
        return self._engine_id

    def container_state(self, container_id: str) -> tuple[bool, str] | None:
        """(running, started at) of a container, or None when it no longer exists."""
        try:
            state = self.api.inspect_container(container_id)["State"]
        except NotFound:
            return None
        return bool(state.get("Running")), str(state.get("StartedAt") or "")

    def run_helper(self, command: list[str], mounts: list[Mount], purpose: str, caps: Iterable[str] = (),
                   **options: Any) -> str:
        """Run a short helper command to completion; return its stdout, raise on failure.

        `options` go to the helper's creation: image, environment, network, hostname.
        """
        cid = self._create_helper(command, mounts, purpose=purpose, caps=caps, **options)
        try:
            sock = self.api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1})
            self.api.start(cid)
            exit_code = _Waiter(self.api, cid)
            err = bytearray()
            out = b"".join(_demux(io.BufferedReader(sock, 65536), err))
            code = exit_code.result()
            if code != 0:
                message = bytes(err).decode("utf-8", "replace").strip()
                raise exited(f"helper for {purpose}", code, message)
            return out.decode("utf-8", "replace")
        finally:
            self._remove(cid)

    @contextmanager
    def helper_output(self, command: list[str], mounts: list[Mount], purpose: str, caps: Iterable[str] = (),
                      strict: bool = True, **options: Any) -> Iterator[Iterator[bytes]]:
        """Run a helper and yield its stdout as it comes (memory stays bounded, unlike run_helper);
        HelperError when the iterator ends and the helper exited non-zero (with `strict` False,
        exit 1 only warns: GNU tar's "files changed while read", whose archive is whole)."""
        cid = self._create_helper(command, mounts, purpose=purpose, caps=caps, **options)
        raw = None
        try:
            sock = self.api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1})
            raw = _raw_socket(sock)
            self.api.start(cid)
            exit_code = _Waiter(self.api, cid)
            yield self._stdout_then_check(exit_code, sock, purpose, strict)
        finally:
            if raw is not None:
                _hang_up(raw)  # abandoned mid-stream: the engine's remove must not wait on it
            self._remove(cid)

    @contextmanager
    def fed_helper(self, command: list[str], mounts: list[Mount], purpose: str, caps: Iterable[str] = (),
                   **options: Any) -> Iterator["FedHelper"]:
        """A started helper whose stdin backupd writes (FedHelper.write), for a consumer that
        keeps whatever arrives before end of input (`restic backup --stdin`).

        The command sees end of input only when FedHelper.finish says the stream is whole:
        its stdin goes through a gate that, at end of input, also waits for finish's word.
        A source that fails (FedHelper.abort), and a backupd that dies mid-stream (its attach
        connection closes, which ends stdin too), leave the command waiting until the helper
        is killed: it never takes a cut stream for a whole one. A command that exits early
        ends the gate's `cat` at its next write, so the helper exits and writes stop.
        """
        gated = ["sh", "-c", f'mkfifo {STDIN_GATE} && {{ cat || exit; read _ < {STDIN_GATE}; }} | "$@"', "sh", *command]
        cid = self._create_helper(gated, mounts, stdin=True, purpose=purpose, caps=caps, **options)
        fed = None
        try:
            sock = self.api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            self.api.start(cid)
            fed = FedHelper(self.api, cid, sock, _Waiter(self.api, cid), purpose)
            yield fed
        finally:
            if fed is not None:
                fed.close()
            self._remove(cid)

    @contextmanager
    def tar_stream(self, source: VolumeSource) -> Iterator[Iterator[bytes]]:
        """Yield an iterator of tar bytes of the source; raise HelperError if tar fails.

        The caller must consume the iterator fully; the exit status is checked
        when it is exhausted, so a helper that dies mid-stream is an error.
        """
        purpose = f"{source.kind} '{source.source}'"
        fifo_dir = self.fifo_dir()
        if fifo_dir is None:
            with self.helper_output(tar_create(source.exclude), [source.mount(read_only=True)], purpose,
                                    READ_CAPS, strict=False) as chunks:
                yield chunks
            return
        with _fifo(fifo_dir, self.owner, helper_writes=True) as (local, inside):
            command = [f"--file={inside}" if a == "--file=-" else a for a in tar_create(source.exclude)]
            cid = self._create_helper(command, [source.mount(read_only=True), fifo_dir.mount], purpose=purpose,
                                      caps=READ_CAPS)
            fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK)  # before start: tar's open never blocks
            _widen(fd)
            try:
                output = _Output(self.api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1}))
                self.api.start(cid)
                exit_code = _Waiter(self.api, cid)
                yield self._pipe_then_check(exit_code, fd, output, purpose)
            finally:
                os.close(fd)
                self._remove(cid)

    def _pipe_then_check(self, exit_code: "_Waiter", fd: int, output: "_Output", purpose: str) -> Iterator[bytes]:
        while not select.select([fd], [], [], 0.2)[0]:
            if output.closed.is_set() and not select.select([fd], [], [], 0)[0]:
                # Exited without ever opening the pipe: a failing tar says why. Exit 0 means
                # tar wrote somewhere else; that must never be recorded as a backup.
                self._check_exit(exit_code, output.text(), purpose)
                raise HelperError(f"helper for {purpose} exited without writing to the named pipe "
                                  "(set BACKUPD_TRANSFER=attach if the engine cannot see backupd's files)")
        os.set_blocking(fd, True)
        while chunk := os.read(fd, PIPE_CHUNK):
            yield chunk
        output.closed.wait(30)
        self._check_exit(exit_code, output.text(), purpose)

    def _stdout_then_check(self, exit_code: "_Waiter", sock: Any, purpose: str,
                           strict: bool = False) -> Iterator[bytes]:
        stderr = bytearray()
        reader = io.BufferedReader(sock, 1 << 20)
        try:
            yield from _demux(reader, stderr)
        finally:
            reader.close()
        self._check_exit(exit_code, bytes(stderr).decode("utf-8", "replace").strip(), purpose, strict)

    def _check_exit(self, exit_code: "_Waiter", message: str, purpose: str, strict: bool = False) -> None:
        """strict: any non-zero exit fails (otherwise exit 1 is GNU tar's "files changed")."""
        code = exit_code.result()
        if code == 1 and not strict:
            # GNU tar: "some files differ" (changed while read); the archive is whole.
            log.warning("tar of %s: files changed while being read: %s", purpose, message[-500:])
        elif code != 0:
            raise exited(f"helper for {purpose}", code, message)

    def tar_extract(self, volume: str, chunks: Iterable[bytes], purpose: str) -> None:
        """Feed a tar stream into a helper that extracts it into the volume."""
        mount = Mount(MOUNT_POINT, volume, type="volume", read_only=False)
        fifo_dir = self.fifo_dir()
        if fifo_dir is None:
            self._extract_over_attach(mount, chunks, purpose)
            return
        with _fifo(fifo_dir, self.owner) as (local, inside):
            command = [f"--file={inside}" if a == "--file=-" else a for a in TAR_EXTRACT]
            cid = self._create_helper(command, [mount, fifo_dir.mount], purpose=purpose, caps=RESTORE_CAPS)
            try:
                output = _Output(self.api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1}))
                self.api.start(cid)
                exit_code = _Waiter(self.api, cid)
                fd = _open_writer(local, output)
                if fd is not None:
                    pipe = open(fd, "wb", buffering=PIPE_WRITE_BUFFER)
                    for chunk in chunks:  # consumed to the end even if tar stops early,
                        if pipe is None:  # so the source's checksum check still runs
                            continue
                        try:
                            pipe.write(chunk)
                        except BrokenPipeError:  # tar exited: at the end-of-archive mark, or failing
                            pipe = _close_quietly(pipe)
                    if pipe is not None:
                        _close_quietly(pipe)
                output.closed.wait(600)
                code = exit_code.result()
                if code != 0 or fd is None:
                    raise exited(f"restore helper for {purpose}", code, output.text())
            finally:
                self._remove(cid)

    def _extract_over_attach(self, mount: Mount, chunks: Iterable[bytes], purpose: str) -> None:
        cid = self._create_helper(TAR_EXTRACT, [mount], stdin=True, purpose=purpose, caps=RESTORE_CAPS)
        try:
            sock = self.api.attach_socket(
                cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            raw = _raw_socket(sock)
            self.api.start(cid)
            exit_code = _Waiter(self.api, cid)
            output = bytearray()
            reader = threading.Thread(target=_drain, args=(sock, output), daemon=True)
            reader.start()
            open_ = True
            try:
                for chunk in chunks:  # consumed to the end so the source's checksum check runs
                    # False once tar exited: at the end-of-archive mark, or failing
                    open_ = open_ and _send(raw, chunk, exit_code.done)
            finally:
                try:
                    raw.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            code = exit_code.result()
            reader.join(timeout=10)
            message = bytes(output[-STDERR_KEEP:]).decode("utf-8", "replace").strip()
            if code != 0:
                raise exited(f"restore helper for {purpose}", code, message)
        finally:
            self._remove(cid)

    @contextmanager
    def helper_stream(self, command: list[str], mounts: list[Mount], purpose: str, caps: Iterable[str] = (),
                      image: str | None = None, stdin: Iterable[bytes] | None = None) -> Iterator["ExecStream"]:
        """Run a helper and hand over its stdout as a stream (and feed it `stdin`), as exec_stream
        does for a command in a running container: for work on a volume whose own container has
        no tool for it, or is stopped (a database file put back). Removed afterwards, always."""
        cid = self._create_helper(command, mounts, stdin=stdin is not None, purpose=purpose, caps=caps, image=image)
        raw = None
        try:
            params = {"stdout": 1, "stderr": 1, "stream": 1, **({"stdin": 1} if stdin is not None else {})}
            sock = self.api.attach_socket(cid, params=params)
            raw = _raw_socket(sock)
            try:
                self.api.start(cid)
            except APIError as exc:  # most often: the image has no such command
                raise HelperStartError(f"cannot run {command[0]} in image '{image or self.helper_image}' for "
                                  f"{purpose}: {exc.explanation or exc}") from None
            yield HelperStream(sock, _Waiter(self.api, cid), stdin)
        finally:
            if raw is not None:
                _hang_up(raw)  # abandoned mid-stream: or the remove waits on a helper blocked writing
            self._remove(cid)

    def mount_holding(self, container: Any, path: str, where: str) -> Mount:
        """The volume or bind mount of `container` that holds `path` (a path inside it), to mount
        at the same place in a helper; NotFoundError when the path is in no mount (then it lives
        in the container's own layer, and no helper can reach it)."""
        best: dict[str, Any] | None = None
        for m in container.attrs.get("Mounts", []):
            dest = m.get("Destination", "").rstrip("/")
            if m.get("Type") in ("volume", "bind") and path.startswith(dest + "/") and \
                    (best is None or len(dest) > len(best["Destination"].rstrip("/"))):
                best = m
        if best is None:
            raise NotFoundError(f"{where}: '{path}' is not on a volume or bind mount of container "
                                f"'{container.name}' (mount its directory as a volume)")
        source = best["Name"] if best["Type"] == "volume" else best["Source"]
        return Mount(best["Destination"], source, type=best["Type"], read_only=False)

    # ------------------------------------------------------------ exec in containers

    def container(self, name: str, where: str) -> Any:
        try:
            return self.client.containers.get(name)
        except NotFound:
            raise NotFoundError(f"{where}: container '{name}' does not exist") from None

    def container_env(self, name: str) -> dict[str, str]:
        env = self.client.containers.get(name).attrs["Config"].get("Env") or []
        return dict(item.split("=", 1) for item in env if "=" in item)

    @contextmanager
    def exec_stream(self, container: str, argv: list[str], env: dict[str, str],
                    stdin: Iterable[bytes] | None = None) -> Iterator["ExecStream"]:
        """Run argv in a running container; yield its stdout chunks, keep stderr's tail.

        The exit code is read once stdout ends (ExecStream.exit_code()).
        """
        try:
            exec_id = self.api.exec_create(container, argv, environment=env, stdout=True,
                                           stderr=True, stdin=stdin is not None)["Id"]
            sock = self.api.exec_start(exec_id, socket=True)
        except NotFound:
            raise NotFoundError(f"container '{container}' does not exist") from None
        except APIError as exc:
            raise HelperError(f"cannot run {argv[0]} in container '{container}': {exc.explanation}") from None
        stream = ExecStream(self.api, exec_id, sock, stdin)
        try:
            yield stream
        finally:
            stream.close()

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
                              purpose=f"volume '{name}'", caps=READ_CAPS)
        return not out.strip()

    def clear_volume(self, name: str) -> None:
        self.run_helper(["find", MOUNT_POINT, "-mindepth", "1", "-maxdepth", "1", "-exec", "rm", "-rf", "{}", "+"],
                        [Mount(MOUNT_POINT, name, type="volume", read_only=False)],
                        purpose=f"volume '{name}'", caps=CLEAR_CAPS)

    def host_path(self, path: str) -> str:
        """Where a path of backupd's own file system lies on the Docker host (for a bind mount):
        itself outside a container, else found through the mount of ours that holds it."""
        own = self.own_container()
        if own is None:
            return path
        best: tuple[str, str] | None = None
        for m in own.attrs.get("Mounts", []):
            dest = m.get("Destination", "").rstrip("/")
            if (path == dest or path.startswith(dest + "/")) and (best is None or len(dest) > len(best[0])):
                best = (dest, m.get("Source", ""))
        if best is None or not best[1]:
            raise ConfigError(f"path '{path}' is not on a volume or bind mount of the backupd container: "
                              "a helper container cannot reach it")
        return best[1] + path[len(best[0]):]

    def running_containers_using(self, volume: str) -> list[Any]:
        return [c for c in self.client.containers.list(filters={"volume": volume})
                if c.labels.get(HELPER_LABEL) is None]


class FedHelper:
    """The stdin of a helper started by DockerHost.fed_helper, and what it printed."""

    def __init__(self, api: Any, cid: str, sock: Any, exit_code: "_Waiter", purpose: str) -> None:
        self.api = api
        self.cid = cid
        self.raw = _raw_socket(sock)
        self.exit_code = exit_code
        self.purpose = purpose
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.open = True  # False once the helper stopped reading (it exited: finish says why)
        self._reader = threading.Thread(target=self._read, args=(sock,), daemon=True)
        self._reader.start()

    def _read(self, sock: Any) -> None:
        try:
            for payload in _demux(io.BufferedReader(sock, 65536), self.stderr):
                self.stdout.extend(payload)
        except OSError:
            pass

    def write(self, chunk: bytes) -> bool:
        """Hand the helper a chunk; False (and nothing more is sent) once it stopped reading."""
        self.open = self.open and _send(self.raw, chunk, self.exit_code.done)
        return self.open

    def finish(self) -> str:
        """The stream is whole: end the helper's input, wait for it and return its stdout
        (HelperError if it exited non-zero)."""
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if not self.exit_code.done():
            try:  # open the gate (blocks until the helper's shell waits at it; see fed_helper)
                exec_id = self.api.exec_create(self.cid, ["sh", "-c", f": > {STDIN_GATE}"])["Id"]
                self.api.exec_start(exec_id)
            except (APIError, NotFound):
                pass  # exited meanwhile: its exit code says how
        code = self.exit_code.result()
        self._reader.join(30)
        if code != 0:
            message = bytes(self.stderr[-STDERR_KEEP:]).decode("utf-8", "replace").strip()
            raise exited(f"helper for {self.purpose}", code, message)
        return bytes(self.stdout).decode("utf-8", "replace")

    def abort(self) -> None:
        """The stream is not whole: kill the helper before its command sees end of input."""
        try:
            self.api.kill(self.cid)
            self.exit_code.result(30)
        except (APIError, NotFound, HelperError):
            pass  # gone already; fed_helper removes it in any case

    def close(self) -> None:
        _hang_up(self.raw)


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


class ExecStream:
    """stdout of a `docker exec`, optionally fed stdin from an iterator in a thread."""

    def __init__(self, api: Any, exec_id: str, sock: Any, stdin: Iterable[bytes] | None) -> None:
        self.api = api
        self.exec_id = exec_id
        self.sock = sock
        self.raw = _raw_socket(sock)
        self.stderr = bytearray()
        self.feed_error: BaseException | None = None
        self._ended = threading.Event()  # stdout is over: the command exited
        self._feeder: threading.Thread | None = None
        if stdin is not None:
            self._feeder = threading.Thread(target=self._feed, args=(stdin,), daemon=True)
            self._feeder.start()

    def _feed(self, chunks: Iterable[bytes]) -> None:
        raw = self.raw
        try:
            for chunk in chunks:
                if not _send(raw, chunk, self._ended.is_set):
                    break  # the command exited; its exit code and stderr say why
        except BaseException as exc:  # noqa: BLE001 - e.g. a checksum mismatch of the source
            self.feed_error = exc
        finally:
            try:
                raw.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stdout(self) -> Iterator[bytes]:
        try:
            yield from _demux(io.BufferedReader(self.sock, 1 << 20), self.stderr)
        finally:
            self._ended.set()

    def drain(self) -> bytes:
        out = bytearray()
        for chunk in self.stdout():
            out += chunk
            del out[:-STDERR_KEEP]
        return bytes(out)

    def exit_code(self, timeout: float = 30) -> int:
        if self._feeder is not None:
            self._feeder.join()
        deadline = time.monotonic() + timeout
        while True:
            info = self.api.exec_inspect(self.exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() > deadline:
                return -1
            time.sleep(0.05)

    def stderr_text(self) -> str:
        return bytes(self.stderr).decode("utf-8", "replace").strip()

    def close(self) -> None:
        _hang_up(self.raw)


class HelperStream(ExecStream):
    """A helper container's stdout (and stdin), read like an exec's; its exit code from the engine's wait."""

    def __init__(self, sock: Any, waiter: "_Waiter", stdin: Iterable[bytes] | None) -> None:
        super().__init__(None, "", sock, stdin)
        self.waiter = waiter

    def exit_code(self, timeout: float = 30) -> int:
        if self._feeder is not None:
            self._feeder.join()
        return self.waiter.result(timeout)


@contextmanager
def _fifo(fifo_dir: FifoDir, owner: str, helper_writes: bool = False) -> Iterator[tuple[Path, str]]:
    """A fresh named pipe (local path, path inside the helper), removed afterwards, named by
    its owner so that recovery can remove it if the process is killed (remove_dead_pipes).

    A backup helper has no DAC_OVERRIDE, so when backupd is not root (the image runs as
    uid 10001) the pipe it writes must allow others to write; the 0700 directory it lies
    in keeps everyone else out.
    """
    name = f"{owner}-{uuid.uuid4().hex}.tar"
    local = fifo_dir.local / name
    os.mkfifo(local, 0o600)
    if helper_writes:
        os.chmod(local, 0o622)
    try:
        yield local, f"{fifo_dir.inside}/{name}"
    finally:
        local.unlink(missing_ok=True)


FIFO_DIR_PREFIX = "backupd-fifo-"  # + owner id + "-" + random: a host process's pipe directory
_OWNED = re.compile(r"([0-9a-f]{32})-[^/]+")  # owner id first, as _fifo and _find_fifo_dir name things


def remove_dead_pipes(whose: Callable[[str | None], bool], temp_root: Path | None = None,
                      state_pipes: Path = Path(STATE_DIR) / ".fifo") -> int:
    """Remove what killed backupd processes left of their named pipes; how many were removed.

    A process killed mid-copy (SIGKILL, or its exit without unwinding) leaves its pipe, and on
    the host its private temp directory, behind. Only those whose owner `whose` picks (our
    catalog's dead processes) are removed: in a shared /tmp, only real directories of our
    own uid, never followed through a link.
    """
    removed = 0
    temp_root = temp_root if temp_root is not None else Path(tempfile.gettempdir())
    try:
        entries = [e for e in os.scandir(temp_root) if e.name.startswith(FIFO_DIR_PREFIX)]
    except OSError:
        entries = []
    for entry in entries:
        owned = _OWNED.fullmatch(entry.name[len(FIFO_DIR_PREFIX):])
        try:
            ours = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if owned and ours and whose(owned.group(1)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    try:
        pipes = list(os.scandir(state_pipes))
    except OSError:  # not in the image, or no pipe made yet
        pipes = []
    for entry in pipes:
        owned = _OWNED.fullmatch(entry.name)
        if owned and entry.name.endswith(".tar") and whose(owned.group(1)):
            try:
                if stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
    return removed


def _widen(fd: int) -> None:
    """A 1 MiB pipe buffer instead of 64 KiB: sixteen times fewer wake-ups per byte."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_CHUNK)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for this user: the default still works


def _raw_socket(sock: Any) -> socket.socket:
    """The socket under docker-py's attach SocketIO (whose close() leaves the
    connection open while the HTTP response still holds it)."""
    return getattr(sock, "_sock", sock)


def _send(raw: socket.socket, data: bytes, gone: Callable[[], bool]) -> bool:
    """Send all of data; False if the receiver went away.

    A plain sendall can block forever: once a helper or exec'd command exits, the
    engine stops reading stdin without closing the connection. So wait for room
    a second at a time and ask gone() in between.
    """
    view = memoryview(data)
    while view:
        try:
            view = view[raw.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            if gone():
                return False
            select.select([], [raw], [], 1.0)
        except (BrokenPipeError, ConnectionResetError):
            return False
    return True


def _hang_up(raw: socket.socket) -> None:
    """End an attach connection for good, whoever else still holds it."""
    for close in (lambda: raw.shutdown(socket.SHUT_RDWR), raw.close):
        try:
            close()
        except OSError:
            pass


def _close_quietly(pipe: Any) -> None:
    try:
        pipe.close()
    except BrokenPipeError:
        pass


def _open_writer(path: Path, output: "_Output") -> int | None:
    """Open a pipe for writing once the helper has opened it for reading (None if it never does)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            if output.closed.wait(0.05):
                return None
            continue
        os.set_blocking(fd, True)
        _widen(fd)
        return fd


class _Waiter:
    """The helper's exit status, asked for as soon as it starts.

    Asking early means the answer arrives even if the container is gone by the
    time we read it (removed by someone else, or by the engine).
    """

    def __init__(self, api: Any, cid: str) -> None:
        self._result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._wait, args=(api, cid), daemon=True)
        self._thread.start()

    def _wait(self, api: Any, cid: str) -> None:
        try:
            self._result["code"] = api.wait(cid, timeout=None)["StatusCode"]
        except (APIError, DockerException, OSError) as exc:
            self._result["error"] = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float = 600) -> int:
        self._thread.join(timeout)
        if "code" not in self._result:
            raise HelperError(f"could not learn how the helper exited: {self._result.get('error', 'timeout')}")
        return int(self._result["code"])


class _Output:
    """A helper's stdout and stderr (tail), read in a thread until the helper exits."""

    def __init__(self, sock: Any) -> None:
        self.data = bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self._read, args=(sock,), daemon=True).start()

    def _read(self, sock: Any) -> None:
        try:
            _drain(sock, self.data)
        except OSError:
            pass
        finally:
            self.closed.set()

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace").strip()


def _drain(sock: Any, keep: bytearray) -> None:
    """Read a helper's stdout and stderr until it closes, keeping the tail of both."""
    for payload in _demux(io.BufferedReader(sock, 65536), keep):
        keep.extend(payload)
        del keep[:-STDERR_KEEP]
