"""Repository mode: volumes go into a deduplicated, encrypted restic repository per job
and destination, driven through helper containers.

restic reads each volume in a helper that mounts it read-only at the same path
every run (/data/<artifact name>), with its cache on a volume backupd owns, so
restic's change detection (path, size, mtime, ctime, inode against the parent
snapshot) skips unchanged files across runs. The repository of job J on a
destination lies at `_restic/J` under the destination's root (a local path is
bind-mounted into the helper; S3 is reached over the network with credentials
in the helper's environment). The repository password reaches restic through
the helper's environment only: never argv, logs or the catalog.

Every restic session backupd starts holds the job's lease (backup, prune,
restore, verify), so no other live backupd process uses that repository at
the same time: the locks a session finds there were left by a run that died
(a SIGKILL of backupd, its helper removed by start-up recovery), and are
removed before it starts.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import posixpath
import shlex
import threading
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

from docker.types import Mount

from backupd.artifact import SourceOpener, check_cancel
from backupd.catalog import BACKUP_ID_RE, DELETED, STORED, SUCCEEDED, ArtifactView, Catalog
from backupd.config import Config, LocalDestination, S3Destination, SftpDestination
from backupd.docker_host import READ_CAPS, RESTORE_CAPS, DockerHost, FedHelper, HelperError, VolumeSource
from backupd.errors import BackupdError, ConfigError
from backupd.excludes import restic_args
from backupd.names import decode_name, encode_name
from backupd.redaction import remember
from backupd.storage import Store
from backupd.storage.base import REPOSITORY_ROOT

log = logging.getLogger(__name__)

# restic reads volumes (backup), restores owners and modes (restore) and writes the repository
# into a destination directory backupd's own user owns (the sidecar runs as uid 10001): one
# set for every restic helper, still without network unless the repository is remote.
REPOSITORY_CAPS = tuple(sorted({*READ_CAPS, *RESTORE_CAPS}))

FORMAT = "restic"  # the artifact's `compression` and `encryption` in the catalog: restic did both
SOURCE_ROOT = "/data"
REPOSITORY_POINT = "/repository"
CACHE_VOLUME = "backupd-restic-cache"
CACHE_POINT = "/cache"
SNAPSHOT_HOST = "backupd"  # restic's --host: snapshots do not depend on the helper's random hostname
# Files a helper makes from its environment before restic starts (an SFTP repository's ssh key
# and known host), on a tmpfs: they never reach a disk and vanish with the helper.
SECRETS_POINT = "/run/backupd"
SECRETS_TMPFS = {SECRETS_POINT: "size=1m,mode=0700"}
SSH_KEY, KNOWN_HOSTS = "ssh_key", "known_hosts"
# A backup into a local repository creates it first when its config is missing (looked at from
# inside the helper: restic makes its files readable by root only, and backupd's sidecar is not root).
# One that receives copies takes the chunker parameters of the repository it copies from, so
# that backups made into it directly later still deduplicate against what was copied.
CREATE_LOCAL = 'test -e "$RESTIC_REPOSITORY/config" || restic init --quiet {} || exit 1; '


class RepositoryError(BackupdError):
    """A restic command failed; the message carries its exit code and stderr."""


def repository_key(job: str) -> str:
    """Where job's repository lies under a destination's root."""
    return f"{REPOSITORY_ROOT}/{job}"


def source_path(name: str) -> str:
    """The stable path a volume is read from (and restored to): restic records it."""
    return f"{SOURCE_ROOT}/{name}"


def snapshot_tags(job: str, backup_id: str, source: str, excludes: Iterable[str] = ()) -> str:
    """restic's --tag value for a snapshot backupd makes: its mark, job and run, what it was read
    from and the patterns left out of it (encoded: a tag list is split at commas), so `catalog
    rebuild` can recreate the artifact whole from the snapshot alone."""
    return ",".join([f"backupd,job={job},backup={backup_id},source={encode_name(source)}",
                     *(f"exclude={encode_name(p)}" for p in excludes)])


def is_snapshot(artifact: ArtifactView) -> bool:
    return artifact.compression == FORMAT


@dataclass(frozen=True)
class Repository:
    """One job's repository on one destination, as a helper reaches it."""

    destination: str
    key: str
    location: str  # RESTIC_REPOSITORY inside the helper
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict, repr=False)  # credentials: never logged
    network: str | None = None
    password: str = field(default="", repr=False)
    options: tuple[str, ...] = ()  # restic's global options (-o ...): never secrets
    files: tuple[tuple[str, str], ...] = ()  # (variable of `env`, file under SECRETS_POINT) to make first

    @property
    def local(self) -> bool:
        """On a bind mount (a local destination), rather than reached over the network."""
        return self.location == REPOSITORY_POINT


def open_repository(config: Config, host: DockerHost, job: str, destination: str) -> Repository:
    """The repository of a job on a destination (not contacted yet, but for an SFTP server's
    host key)."""
    spec = config.destinations[destination]
    key = repository_key(job)
    password = config.repository_password(job, destination).get_secret_value()
    if isinstance(spec, LocalDestination):
        local = Path(spec.path) / key
        local.mkdir(parents=True, exist_ok=True)
        mount = Mount(REPOSITORY_POINT, host.host_path(str(local)), type="bind")
        return Repository(destination, key, REPOSITORY_POINT, (mount,), password=password)
    if isinstance(spec, S3Destination):
        endpoint = (spec.endpoint_url or "https://s3.amazonaws.com").rstrip("/")
        prefix = spec.prefix.strip("/")
        path = "/".join(p for p in (spec.bucket, prefix, key) if p)
        env = {}
        if spec.access_key_id:
            env["AWS_ACCESS_KEY_ID"] = spec.access_key_id
        if spec.secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = spec.secret_access_key.get_secret_value()
        if spec.region:
            env["AWS_DEFAULT_REGION"] = spec.region
        return Repository(destination, key, f"s3:{endpoint}/{path}", (), env,
                          _network(host, urlparse(endpoint).hostname or ""), password)
    if isinstance(spec, SftpDestination):
        return _sftp_repository(destination, spec, key, host, password)
    raise ConfigError(f"destinations.{destination}: type {spec.type} cannot hold a repository yet")


def _sftp_repository(destination: str, spec: SftpDestination, key: str, host: DockerHost,
                     password: str) -> Repository:
    """restic's sftp backend runs OpenSSH's ssh in the helper. ssh trusts exactly the host key
    backupd's own SFTP client has verified (known_hosts or the pinned fingerprint) and nothing
    else; the private key and that known host reach the helper in its environment and become
    files on its tmpfs. No secret is in the command line."""
    from backupd.storage.sftp import SftpStore

    if spec.key_file is None:  # refused when the config was loaded; a guard for callers that skip it
        raise ConfigError(f"destinations.{destination}.key_file: format: repository logs in to SFTP with a key")
    store = SftpStore(destination, spec)
    try:
        server_key = store.host_key()
    finally:
        store.close()
    try:
        private_key = spec.key_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"destinations.{destination}.key_file: cannot read {spec.key_file}: {exc.strerror}") from None
    remember(private_key.strip())
    known = spec.host if spec.port == 22 else f"[{spec.host}]:{spec.port}"
    algorithms = server_key.get_name()
    if algorithms == "ssh-rsa":  # the key type of RSA keys; OpenSSH signs with SHA-2 now
        algorithms = "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
    ssh = ["ssh", "-F", "/dev/null", "-i", f"{SECRETS_POINT}/{SSH_KEY}",
           "-o", f"UserKnownHostsFile={SECRETS_POINT}/{KNOWN_HOSTS}", "-o", "GlobalKnownHostsFile=/dev/null",
           "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlgorithms={algorithms}",
           "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ServerAliveInterval=30",
           "-p", str(spec.port), "-l", spec.user, spec.host, "-s", "sftp"]
    root = spec.path.rstrip("/") or "/"
    path = posixpath.normpath(posixpath.join(root, key))
    env = {"BACKUPD_SSH_KEY": private_key,
           "BACKUPD_KNOWN_HOSTS": f"{known} {server_key.get_name()} {server_key.get_base64()}"}
    return Repository(destination, key, f"sftp:{spec.user}@{spec.host}:{path}", (), env,
                      _network(host, spec.host), password, ("-o", f"sftp.command={' '.join(ssh)}"),
                      (("BACKUPD_SSH_KEY", SSH_KEY), ("BACKUPD_KNOWN_HOSTS", KNOWN_HOSTS)))


def _network(host: DockerHost, hostname: str) -> str:
    """A network from which the helper reaches what backupd reaches: backupd's own (in a
    container), else the host's (a CLI on the host, e.g. an endpoint on 127.0.0.1)."""
    own = host.own_container()
    if own is not None:
        return f"container:{own.id}"
    try:
        loopback = ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        loopback = hostname == "localhost"
    return "host" if loopback else "bridge"


class Restic:
    """Runs restic in helper containers of the repository image."""

    def __init__(self, host: DockerHost, config: Config) -> None:
        self.host = host
        self.image = config.repository_image or host.helper_image

    def check_image(self) -> None:
        try:
            self.host.client.images.get(self.image)
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound and transport errors alike
            raise ConfigError(f"repository_image: image '{self.image}' is not present on the Docker engine "
                              "(it needs restic and glibc)") from None

    def _session(self, repo: Repository, args: list[str], mounts: Iterable[Mount] = (), create: bool = False,
                 unlock: bool = True, then: list[str] | None = None,
                 discard: bool = False) -> tuple[list[str], list[Mount], dict[str, Any]]:
        """The helper's command, mounts and options for one restic session on the repository:
        its secret files written onto the tmpfs, a local repository created if asked, dead runs'
        locks removed (see the module doc), then restic ARGS (and `then`, a second command)."""
        restic = shlex.join(["restic", *repo.options])
        session = "umask 077 && " + "".join(f'printf "%s\\n" "${var}" >{SECRETS_POINT}/{name} && '
                                            for var, name in repo.files)
        if create and repo.local:
            session += CREATE_LOCAL.format("--copy-chunker-params" if "RESTIC_FROM_REPOSITORY" in repo.env else "")
        if unlock:
            remove = f"{restic} unlock --remove-all --quiet"
            # A local repository's locks directory is looked at first: when it is empty (the common
            # case) that saves a restic start and its key derivation.
            session += (f'{{ [ -z "$(ls -A "$RESTIC_REPOSITORY/locks" 2>/dev/null)" ] || {remove}; }} && '
                        if repo.local else f"{remove} && ")
        session += f'{restic} "$@" && exec {restic} {shlex.join(then)}' if then else f'exec {restic} "$@"'
        if discard:
            session += " >/dev/null"
        env = {"RESTIC_REPOSITORY": repo.location, "RESTIC_PASSWORD": repo.password,
               "RESTIC_CACHE_DIR": CACHE_POINT, **repo.env}
        cache = Mount(CACHE_POINT, CACHE_VOLUME, type="volume")
        log.debug("restic %s on %s", shlex.join(args), repo.destination)
        options = {"caps": REPOSITORY_CAPS, "image": self.image, "environment": env, "network": repo.network,
                   "hostname": SNAPSHOT_HOST, "tmpfs": SECRETS_TMPFS if repo.files else None}
        return ["sh", "-c", session, "sh", *args], [*repo.mounts, cache, *mounts], options

    def run(self, repo: Repository, args: list[str], purpose: str, mounts: Iterable[Mount] = (),
            create: bool = False, unlock: bool = True, then: list[str] | None = None,
            discard: bool = False) -> str:
        """restic ARGS on the repository (see _session); stdout, or RepositoryError. With
        `discard`, stdout is thrown away inside the helper (a read that only proves data)."""
        command, all_mounts, options = self._session(repo, args, mounts, create, unlock, then, discard)
        try:
            return self.host.run_helper(command, all_mounts, purpose, **options)
        except HelperError as exc:
            raise RepositoryError(f"repository {repo.key} on {repo.destination}: {exc}") from None

    def backup_input(self, repo: Repository, path: str, job: str, backup_id: str, source: str,
                     purpose: str) -> AbstractContextManager[FedHelper]:
        """A helper running `restic backup --stdin` into the repository, stored as file `path`
        (the same name every run, so restic's chunking finds what earlier runs stored). Its
        snapshot exists only if FedHelper.finish is called (see DockerHost.fed_helper)."""
        args = ["backup", "--json", "--quiet", "--host", SNAPSHOT_HOST, "--stdin", "--stdin-filename", path,
                "--tag", snapshot_tags(job, backup_id, source)]
        command, mounts, options = self._session(repo, args, create=True)
        return self.host.fed_helper(command, mounts, purpose, **options)

    @contextmanager
    def read_file(self, repo: Repository, snapshot_id: str, path: str) -> Iterator[Iterator[bytes]]:
        """The bytes of one file of a snapshot (`restic dump`), as they come; RepositoryError at
        the end if restic failed (restic checks every blob it reads against its hash)."""
        command, mounts, options = self._session(repo, ["dump", snapshot_id, path])

        def checked(chunks: Iterable[bytes]) -> Iterator[bytes]:
            try:
                yield from chunks
            except HelperError as exc:
                raise RepositoryError(f"repository {repo.key} on {repo.destination}: {exc}") from None

        with self.host.helper_output(command, mounts, f"dump of {path} from {snapshot_id}", **options) as chunks:
            yield checked(chunks)

    def exists(self, repo: Repository, store: Store) -> bool:
        """Does the repository's config object exist? A local one is looked at by a helper
        (see CREATE_LOCAL)."""
        if not repo.local:
            return store.stat(f"{repo.key}/config") is not None
        out = self.host.run_helper(["sh", "-c", f'test -e "{REPOSITORY_POINT}/config" && echo yes || echo no'],
                                   [*repo.mounts], f"repository {repo.key}", caps=REPOSITORY_CAPS,
                                   image=self.image)
        return out.strip() == "yes"

    def init_if_missing(self, repo: Repository, store: Store) -> None:
        """`restic init` a remote repository whose config object does not exist yet (a local one
        is created by its first backup's helper, which saves a helper start per run)."""
        if repo.local or store.stat(f"{repo.key}/config") is not None:
            return
        log.info("creating repository %s on %s", repo.key, repo.destination)
        self.run(repo, ["init", "--quiet"], f"init of {repo.key}", unlock=False)

    def backup(self, repo: Repository, source: VolumeSource, job: str, backup_id: str) -> dict[str, Any]:
        """Snapshot one volume; restic's JSON summary (snapshot_id, data_added, total_bytes_processed)."""
        path = source_path(source.name)
        out = self.run(repo, ["backup", "--json", "--quiet", "--host", SNAPSHOT_HOST,
                              "--tag", snapshot_tags(job, backup_id, f"{source.kind}:{source.source}", source.exclude),
                              *restic_args(source.exclude, path), path],
                       f"backup of {source.kind} '{source.source}'",
                       [Mount(path, source.source, type=source.kind, read_only=True)], create=True)
        return _summary(repo, out)

    def copy(self, session: Repository, snapshot_ids: list[str], backup_id: str) -> dict[str, str]:
        """`restic copy` snapshots into the repository of a copy_session; which snapshot each
        became there (by the source's id). Snapshots copied before are not copied again."""
        out = self.run(session, ["copy", "--quiet", *snapshot_ids], f"copy to {session.key}", create=True,
                       then=["snapshots", "--json", "--tag", f"backup={backup_id}"])
        listed = next((line for line in reversed(out.splitlines()) if line.startswith("[")), "[]")
        made = {}
        for snap in json.loads(listed):
            for original in snapshot_ids:
                if str(snap.get("original", "")).startswith(original):
                    made[original] = snap["short_id"]
        return made

    def restore(self, repo: Repository, snapshot_id: str, name: str, volume: str) -> None:
        """Restore a volume's snapshot into a volume mounted where it was read from."""
        self.run(repo, ["restore", snapshot_id, "--target", "/"], f"restore into volume '{volume}'",
                 [Mount(source_path(name), volume, type="volume")])

    def forget(self, repo: Repository, snapshot_ids: list[str]) -> None:
        self.run(repo, ["forget", "--quiet", *snapshot_ids], f"forget in {repo.key}")

    def prune(self, repo: Repository, max_repack: str | None = None) -> str:
        args = ["prune", "--max-unused", "10%"] + (["--max-repack-size", max_repack] if max_repack else [])
        return self.run(repo, args, f"prune of {repo.key}")

    def check(self, repo: Repository, read_data_subset: str | None = None) -> str:
        args = ["check"] + ([f"--read-data-subset={read_data_subset}"] if read_data_subset else [])
        return self.run(repo, args, f"check of {repo.key}")

    def snapshots(self, repo: Repository) -> list[dict[str, Any]]:
        return json.loads(self.run(repo, ["snapshots", "--json"], f"snapshots of {repo.key}") or "[]")


# Where a helper that copies between repositories sees a local source repository.
SOURCE_REPOSITORY_POINT = "/from-repository"
Snapshot = tuple[str, int | None, int]  # snapshot id, bytes it added (None: not known), bytes it holds


def _summary(repo: Repository, out: str) -> dict[str, Any]:
    """restic backup's JSON summary (snapshot_id, data_added, total_bytes_processed)."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            if data.get("message_type") == "summary" and data.get("snapshot_id"):
                return data
    raise RepositoryError(f"repository {repo.key} on {repo.destination}: restic backup printed no "
                          f"summary: {out[-300:]}")


STREAMED_KINDS = ("database",)  # artifacts stored as one file of a snapshot (see input_path)


def input_path(kind: str, name: str) -> str:
    """The file a streamed artifact (a dump) is stored as in its snapshot: named by what it
    holds, the same every run (encoded: a database called `a/b` is one file name)."""
    return f"/{kind}-{encode_name(name)}"


def snapshot_holds(paths: list[str]) -> tuple[str, str] | None:
    """(kind, name) of the artifact a backupd snapshot holds, from its paths (the inverse of
    source_path and input_path); None for a snapshot backupd did not make this way."""
    if len(paths) != 1:
        return None
    path = paths[0]
    if path.startswith(SOURCE_ROOT + "/"):
        name = path[len(SOURCE_ROOT) + 1:]
        return ("volume", name) if name and "/" not in name and name not in (".", "..") else None
    kind, dash, encoded = path[1:].partition("-")
    if not path.startswith("/") or not dash or kind not in STREAMED_KINDS or not encoded:
        return None
    try:
        name = decode_name(encoded)
    except UnicodeDecodeError:
        return None
    return (kind, name) if input_path(kind, name) == path else None


def copy_session(source: Repository, target: Repository) -> Repository | None:
    """`target` as a helper sees it that also reaches `source` as the source of `restic copy`;
    None when one helper cannot reach both (restic takes one set of S3 credentials, one ssh
    command and one network per process)."""
    env = dict(target.env)
    for name, value in source.env.items():
        if env.setdefault(name, value) != value:
            return None
    if source.network and target.network and source.network != target.network:
        return None
    if source.options and target.options and source.options != target.options:
        return None
    location, mounts = source.location, []
    for mount in source.mounts:  # a local source moves aside: the target may be local too
        mounts.append(Mount(SOURCE_REPOSITORY_POINT, mount["Source"], type="bind"))  # restic locks it: writable
        location = SOURCE_REPOSITORY_POINT
    env.update(RESTIC_FROM_REPOSITORY=location, RESTIC_FROM_PASSWORD=source.password)
    return Repository(target.destination, target.key, target.location, (*target.mounts, *mounts), env,
                      target.network or source.network, target.password, target.options or source.options,
                      tuple(dict.fromkeys((*target.files, *source.files))))


class SnapshotWriter:
    """One run's repositories, opened (and created) once; each volume is read once.

    Each volume is backed up into the primary repository (the first local destination, else the
    first reachable one). After every volume is read (and stopped containers run again),
    `finish` copies the run's snapshots from there to the other repositories with `restic copy`
    and records every copy. A repository one helper cannot reach together with the primary
    gets its own backup of each volume instead, as does every repository for a volume whose
    backup into the primary failed. A destination whose repository cannot be opened fails its
    copies with that reason and is not tried again in this run; the others carry on (the run
    is then partial).
    """

    def __init__(self, config: Config, host: DockerHost, job: str, stores: dict[str, Store]) -> None:
        self.restic = Restic(host, config)
        self.job = job
        self.repos: dict[str, Repository] = {}
        self.broken: dict[str, str] = {}
        for dest, store in stores.items():
            try:
                repo = open_repository(config, host, job, dest)
                self.restic.init_if_missing(repo, store)
                self.repos[dest] = repo
            except Exception as exc:  # noqa: BLE001 - one destination must not sink the others
                self.broken[dest] = str(exc)
                log.error("repository of job %s on %s is unusable: %s", job, dest, exc)
        order = sorted(self.repos, key=lambda d: not self.repos[d].local)  # local ones first, else as listed
        self.primary = order[0] if order else None
        self.sessions: dict[str, Repository] = {}  # destination -> helper view for copies from the primary
        self.direct: list[str] = []  # destinations backed up directly
        for dest in order[1:]:
            session = copy_session(self.repos[order[0]], self.repos[dest])
            if session is None:
                self.direct.append(dest)
            else:
                self.sessions[dest] = session
        self.pending: list[tuple[int, dict[str, Snapshot], dict[str, str]]] = []

    def snapshot(self, catalog: Catalog, backup_id: str, source: VolumeSource) -> None:
        """Back up one volume into the primary repository (and those it cannot be copied to);
        its artifact is recorded when `finish` has copied it."""
        keys = {d: repository_key(self.job) for d in [*self.repos, *self.broken]}
        art_id = catalog.add_artifact(backup_id, "volume", source.name, f"{source.kind}:{source.source}",
                                      FORMAT, FORMAT, keys, source.exclude)
        snapshots: dict[str, Snapshot] = {}
        errors = dict(self.broken)
        try:
            targets = [self.primary, *self.direct] if self.primary else []
            for dest in targets:
                self._backup(dest, source, backup_id, snapshots, errors)
            if self.primary is not None and self.primary not in snapshots:
                for dest in self.sessions:  # nothing to copy from: each reads the volume itself
                    self._backup(dest, source, backup_id, snapshots, errors)
        except BaseException as exc:
            catalog.fail_artifact(art_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
            raise
        self.pending.append((art_id, snapshots, errors))

    def _backup(self, dest: str, source: VolumeSource, backup_id: str, snapshots: dict[str, Snapshot],
                errors: dict[str, str]) -> None:
        try:
            summary = self.restic.backup(self.repos[dest], source, self.job, backup_id)
        except BackupdError as exc:
            errors[dest] = str(exc)
            log.error("volume %s to %s failed: %s", source.name, dest, exc)
            return
        snapshots[dest] = (summary["snapshot_id"], int(summary.get("data_added", 0)),
                           int(summary.get("total_bytes_processed", 0)))
        log.info("volume %s: snapshot %s on %s, %d bytes added of %d", source.name, summary["snapshot_id"],
                 dest, snapshots[dest][1], snapshots[dest][2])

    def finish(self, catalog: Catalog, backup_id: str) -> None:
        """Copy the run's snapshots from the primary to the other repositories (one `restic copy`
        per repository), then record every artifact with each destination's snapshot or error."""
        try:
            for dest, session in self.sessions.items():
                todo = [(snaps, errs) for _, snaps, errs in self.pending
                        if self.primary in snaps and dest not in snaps and dest not in errs]
                if not todo:
                    continue
                assert self.primary is not None
                originals = [snaps[self.primary][0] for snaps, _ in todo]
                try:
                    made = self.restic.copy(session, originals, backup_id)
                except BackupdError as exc:
                    log.error("copy of backup %s to %s failed: %s", backup_id, dest, exc)
                    made, failure = {}, str(exc)
                else:
                    failure = "restic copy made no snapshot of it"
                for snaps, errs in todo:
                    original = snaps[self.primary]
                    if original[0] in made:
                        snaps[dest] = (made[original[0]], None, original[2])
                    else:
                        errs[dest] = failure
                log.info("copied %d snapshot(s) of backup %s from %s to %s", len(made), backup_id,
                         self.primary, dest)
        except BaseException as exc:
            self.abandon(catalog, "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc))
            raise
        for art_id, snaps, errs in self.pending:
            catalog.finish_snapshots(art_id, snaps, errs)
        self.pending = []

    def abandon(self, catalog: Catalog, reason: str) -> None:
        """The run stops before `finish`: record the snapshots made so far, the rest failed."""
        for art_id, snaps, errs in self.pending:
            catalog.finish_snapshots(art_id, snaps, {**{d: reason for d in self.repos}, **errs})
        self.pending = []

    def stream(self, catalog: Catalog, backup_id: str, kind: str, name: str, source: str,
               open_source: SourceOpener, cancel: threading.Event | None = None) -> str:
        """Store a stream (a database dump, of any kind) as one file of a snapshot in every
        repository, the source read once and fed to a helper per repository.

        A source that fails (the dump tool's exit code, its timeout, a cancel) kills the
        helpers before restic sees the end of its input, so no snapshot holds the cut stream;
        the artifact fails with the source's reason, which is raised.
        """
        keys = {d: repository_key(self.job) for d in [*self.repos, *self.broken]}
        art_id = catalog.add_artifact(backup_id, kind, name, source, FORMAT, FORMAT, keys)
        path = input_path(kind, name)
        errors = dict(self.broken)
        snapshots: dict[str, tuple[str, int, int]] = {}
        with ExitStack() as helpers:
            feeds: dict[str, FedHelper] = {}
            for dest, repo in self.repos.items():
                try:
                    feeds[dest] = helpers.enter_context(
                        self.restic.backup_input(repo, path, self.job, backup_id, source,
                                                 f"{kind} '{name}' into {dest}"))
                except BackupdError as exc:
                    errors[dest] = str(exc)
            if not feeds:  # no repository to take it: the dump is not even started
                return catalog.finish_snapshots(art_id, snapshots, errors)
            try:
                with open_source() as chunks:
                    for chunk in chunks:
                        check_cancel(cancel, f"{kind} '{name}'")
                        for feed in feeds.values():
                            feed.write(chunk)  # a helper that stopped reading says why at finish
            except BaseException as exc:
                for feed in feeds.values():
                    feed.abort()
                reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
                catalog.fail_artifact(art_id, reason)
                log.error("%s %s failed, no snapshot kept: %s", kind, name, reason)
                if isinstance(exc, Exception):
                    for dest in feeds:
                        self._unlock(dest)
                raise
            for dest, feed in feeds.items():
                repo = self.repos[dest]
                try:
                    summary = _summary(repo, feed.finish())
                except HelperError as exc:
                    errors[dest] = f"repository {repo.key} on {dest}: {exc}"
                except RepositoryError as exc:
                    errors[dest] = str(exc)
                else:
                    snapshots[dest] = (summary["snapshot_id"], int(summary.get("data_added", 0)),
                                       int(summary.get("total_bytes_processed", 0)))
                    log.info("%s %s: snapshot %s on %s, %d bytes added of %d", kind, name, summary["snapshot_id"],
                             dest, snapshots[dest][1], snapshots[dest][2])
                if dest in errors:
                    log.error("%s %s to %s failed: %s", kind, name, dest, errors[dest])
        return catalog.finish_snapshots(art_id, snapshots, errors)

    def _unlock(self, dest: str) -> None:
        """Remove the lock a killed helper's restic left (this run holds the job's lease, so
        no other restic of backupd's uses the repository), so the repository is left clean."""
        try:
            self.restic.run(self.repos[dest], ["unlock"], f"unlock of {self.repos[dest].key}")
        except BackupdError as exc:
            log.warning("the next session on %s removes the lock a killed helper left: %s", dest, exc)


def stored_snapshots(artifact: ArtifactView) -> list[tuple[str, str, str]]:
    """(destination, repository key, snapshot id) of each stored snapshot of an artifact."""
    return [(c.destination, c.key, c.snapshot_id) for c in artifact.copies
            if c.status == STORED and c.snapshot_id]


def restore_snapshot(*, config: Config, catalog: Catalog, host: DockerHost, backup_id: str,
                     artifact: ArtifactView, target: str, force: bool) -> str:
    """Restore a volume's snapshot into `target`, with the archive restore's safety rules:
    a non-empty target only with force (its running containers stopped meanwhile), and a
    failed restore into a new or empty volume leaves it as it was."""
    from backupd.quiesce.stop import held
    from backupd.restore import _into_empty, preference
    from backupd.errors import RefusedError

    backup = catalog.get(backup_id)
    restic = Restic(host, config)
    restic.check_image()
    rank = {name: i for i, name in enumerate(preference(config, backup.job))}
    snapshots = sorted(stored_snapshots(artifact), key=lambda s: rank.get(s[0], len(rank)))
    if not snapshots:
        raise BackupdError(f"backup {backup_id}: volume '{artifact.name}' has no stored snapshot")
    exists = host.volume_exists(target)
    empty = not exists or host.volume_is_empty(target)
    problems: list[str] = []
    for dest, _key, snapshot_id in snapshots:
        if dest not in config.destinations:
            problems.append(f"{dest}: not in the current config")
            continue
        try:
            repo = open_repository(config, host, backup.job, dest)
            log.info("restoring %s from backup %s (snapshot %s on %s) into volume %s",
                     artifact.name, backup_id, snapshot_id, dest, target)
            if empty:
                _into_empty(host, target, exists, lambda: restic.restore(repo, snapshot_id, artifact.name, target))
            else:
                if not force:
                    raise RefusedError(
                        f"volume '{target}' is not empty; restore to a new volume with --to-volume NAME, "
                        "or pass --force to replace its contents (its containers are stopped meanwhile)")
                # The snapshot must be readable before anything is emptied for it.
                restic.run(repo, ["cat", "snapshot", snapshot_id], f"snapshot {snapshot_id}")
                with held(catalog, backup_id, host.running_containers_using(target)) as restart_problems:
                    host.clear_volume(target)
                    restic.restore(repo, snapshot_id, artifact.name, target)
                if restart_problems:
                    raise BackupdError("; ".join(restart_problems))
            log.info("restored %s into volume %s", artifact.name, target)
            return target
        except RepositoryError as exc:
            problems.append(str(exc))
            log.warning("snapshot %s on %s unusable: %s", snapshot_id, dest, exc)
            if not empty:
                break  # the target was changed: do not try to pile another copy on top
    raise BackupdError(f"backup {backup_id}: no usable snapshot of volume '{artifact.name}': "
                       + "; ".join(problems))


def proven_input(*, config: Config, host: DockerHost, job: str, backup_id: str,
                 artifact: ArtifactView) -> Iterator[bytes]:
    """The stream a snapshot holds (a dump), from the first destination (in the job's order)
    whose snapshot reads back whole: it is read once inside a helper to prove it (restic checks
    every blob), like an archive copy is proven before a database sees a byte of it. Returns a
    lazy iterator: nothing is read again until the caller (restore) starts consuming it."""
    from backupd.restore import preference

    restic = Restic(host, config)
    restic.check_image()
    rank = {name: i for i, name in enumerate(preference(config, job))}
    snapshots = sorted(stored_snapshots(artifact), key=lambda s: rank.get(s[0], len(rank)))
    if not snapshots:
        raise BackupdError(f"backup {backup_id}: {artifact.kind} '{artifact.name}' has no stored snapshot")
    path = input_path(artifact.kind, artifact.name)
    problems: list[str] = []
    for dest, _key, snapshot_id in snapshots:
        if dest not in config.destinations:
            problems.append(f"{dest}: not in the current config")
            continue
        repo = open_repository(config, host, job, dest)
        try:
            restic.run(repo, ["dump", snapshot_id, path], f"proof of {path} in {snapshot_id}", discard=True)
        except RepositoryError as exc:
            problems.append(str(exc))
            log.warning("snapshot %s on %s unusable: %s", snapshot_id, dest, exc)
            continue
        log.info("%s %s of backup %s: snapshot %s on %s reads back whole", artifact.kind, artifact.name,
                 backup_id, snapshot_id, dest)
        return _read_lazily(restic, repo, snapshot_id, path)
    raise BackupdError(f"backup {backup_id}: no usable snapshot of {artifact.kind} '{artifact.name}': "
                       + "; ".join(problems))


def _read_lazily(restic: Restic, repo: Repository, snapshot_id: str, path: str) -> Iterator[bytes]:
    with restic.read_file(repo, snapshot_id, path) as chunks:
        yield from chunks


def forget_doomed(config: Config, catalog: Catalog, host: DockerHost, backups: list[Any]) -> list[str]:
    """`restic forget` exactly the snapshots of the doomed backups, one command per repository;
    each forgotten copy is marked deleted. Returns the failures (the copies stay, retried later)."""
    by_repo: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for backup in backups:
        for art in backup.artifacts:
            for copy in art.copies:
                if copy.snapshot_id and copy.status == STORED:
                    by_repo.setdefault((copy.destination, backup.job), []).append(
                        (backup.id, copy.key, copy.snapshot_id))
    restic = Restic(host, config) if by_repo else None
    failures = []
    for (dest, job), doomed in sorted(by_repo.items()):
        assert restic is not None
        try:
            if dest not in config.destinations:
                raise BackupdError("destination not in config")
            repo = open_repository(config, host, job, dest)
            restic.forget(repo, [snapshot for _, _, snapshot in doomed])
        except BackupdError as exc:
            failures += [f"{b}: {dest} snapshot {s}: {exc}" for b, _, s in doomed]
            continue
        for backup_id, _key, snapshot_id in doomed:
            catalog.set_snapshot_status(backup_id, dest, snapshot_id, DELETED)
        log.info("forgot %d snapshot(s) of job %s on %s: %s", len(doomed), job, dest,
                 " ".join(s for _, _, s in doomed))
    return failures


def compact_job(config: Config, host: DockerHost, job: str, stores: dict[str, Store]) -> list[str]:
    """`restic prune` the job's repository on each destination that has one; what each did."""
    restic = Restic(host, config)
    done = []
    for dest, store in stores.items():
        key = repository_key(job)
        try:
            repo = open_repository(config, host, job, dest)
            if not restic.exists(repo, store):
                done.append(f"{dest}: no repository")
                continue
            out = restic.prune(repo)
        except BackupdError as exc:
            done.append(f"{dest}: prune failed: {exc}")
            log.error("prune of repository %s on %s failed: %s", key, dest, exc)
            continue
        freed = [line.strip() for line in out.splitlines() if "this removes" in line or "remaining" in line]
        done.append(f"{dest}: repository compacted" + (f" ({'; '.join(freed)})" if freed else ""))
    return done


def rebuild_from_repository(config: Config, catalog: Catalog, host: DockerHost, job: str,
                            destination: str) -> tuple[list[str], list[str]]:
    """`catalog rebuild` for a repository job: re-create its backups from the snapshots in its
    repository on one destination. Returns (imported ids, ids already in the catalog).

    backupd tags every snapshot with its job, run and source (snapshot_tags) and stores a volume
    at /data/<name>, a dump as the file /database-<name> (snapshot_holds), so a snapshot names
    its job, run and artifact; the run's start time is in its id. Snapshots of one run become
    one backup, `succeeded`, with one artifact per snapshot and a stored copy on this
    destination (size unknown: restic keeps no summary in 0.14). A run the catalog already
    holds gains this destination's snapshot of each artifact it knows. Snapshots made
    otherwise (another job, by hand) are left out, each with a warning, as is a dump whose
    snapshot does not say what it was dumped from (restore could not put it back).
    """
    restic = Restic(host, config)
    repo = open_repository(config, host, job, destination)
    runs: dict[str, dict[tuple[str, str], tuple[str, tuple[str, ...], dict[str, Any]]]] = {}
    for snap in restic.snapshots(repo):
        found = _rebuilt_artifact(snap, job)
        if isinstance(found, str):
            log.warning("catalog rebuild: snapshot %s in %s on %s %s: left out",
                        snap.get("short_id"), repo.key, destination, found)
            continue
        backup_id, kind, name, source, excludes = found
        runs.setdefault(backup_id, {}).setdefault((kind, name), (source, excludes, snap))
    imported, skipped = [], []
    key = repository_key(job)
    for backup_id, held in sorted(runs.items()):
        started = datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        artifacts = [{"kind": kind, "name": name, "source": source, "compression": FORMAT, "encryption": FORMAT,
                      "status": SUCCEEDED, "size": None, "sha256": None, "excludes": list(excludes),
                      "destinations": [{"destination": destination, "key": key, "status": STORED,
                                        "snapshot_id": snap["short_id"]}]}
                     for (kind, name), (source, excludes, snap) in sorted(held.items())]
        data = {"id": backup_id, "job": job, "status": SUCCEEDED, "started_at": started.isoformat(),
                "finished_at": max(str(s.get("time", "")) for _, _, s in held.values()) or None,
                "host": "", "artifacts": artifacts}
        if catalog.import_backup(data):
            imported.append(backup_id)
            continue
        skipped.append(backup_id)
        known = {(a.kind, a.name) for a in catalog.get(backup_id).artifacts}
        added = catalog.add_copies(backup_id, [(kind, name, destination, key, STORED, None, snap["short_id"])
                                               for (kind, name), (_, _, snap) in held.items()
                                               if (kind, name) in known])
        if added:
            log.info("catalog rebuild: added %d snapshot(s) on %s to backup %s", added, destination, backup_id)
    return imported, skipped


def _tag_values(tags: list[str], key: str) -> list[str]:
    """The values of a snapshot's `key=value` tags (see snapshot_tags), in order."""
    return [tag.partition("=")[2] for tag in tags if tag.startswith(key + "=")]


def _rebuilt_artifact(snap: dict[str, Any], job: str) -> tuple[str, str, str, str, tuple[str, ...]] | str:
    """(backup id, kind, name, source, exclude patterns) of the artifact a snapshot holds, or why
    it cannot be taken back into the catalog."""
    from backupd.quiesce.databases import parse_source

    tags = snap.get("tags") or []
    backup_id = next(iter(_tag_values(tags, "backup")), "")
    held = snapshot_holds(snap.get("paths") or [])
    if "backupd" not in tags or f"job={job}" not in tags or not BACKUP_ID_RE.fullmatch(backup_id) or held is None:
        return f"was not made by backupd for job {job}"
    kind, name = held
    encoded = next(iter(_tag_values(tags, "source")), None)
    try:
        source = decode_name(encoded) if encoded is not None else ""
    except UnicodeDecodeError:
        source = ""
    if kind == "volume":  # restore needs no source when it is told the target (--to-volume)
        try:
            excludes = tuple(decode_name(value) for value in _tag_values(tags, "exclude"))
        except UnicodeDecodeError:
            return f"holds volume '{name}' of backup {backup_id} with an exclude tag that is not backupd's"
        return (backup_id, kind, name, source if source.partition(":")[0] in ("volume", "bind") else "",
                excludes)
    try:
        parse_source(source)
    except BackupdError:
        return (f"holds {kind} '{name}' of backup {backup_id} but not what it was dumped from (made by an "
                f"older backupd); read it with `restic dump {snap.get('short_id')} {input_path(kind, name)}`")
    return backup_id, kind, name, source, ()


READ_DATA_SUBSET = "10%"  # what `verify` reads back of each repository's data, chosen at random by restic


def snapshot_checker(config: Config, host: Callable[[], DockerHost]) -> Callable[[str, str, str], tuple[bool, str]]:
    """For `verify`: check(job, destination, snapshot id) -> (ok, detail). Each repository is
    checked once (`restic check --read-data-subset`), then each snapshot is looked up in it."""
    found: dict[tuple[str, str], tuple[str | None, set[str]]] = {}

    def check(job: str, destination: str, snapshot_id: str) -> tuple[bool, str]:
        if (job, destination) not in found:
            try:
                restic = Restic(host(), config)
                repo = open_repository(config, restic.host, job, destination)
                restic.check(repo, READ_DATA_SUBSET)
                ids = {i for s in restic.snapshots(repo) for i in (s["id"], s["short_id"])}
                found[(job, destination)] = (None, ids)
            except BackupdError as exc:
                found[(job, destination)] = (str(exc), set())
        error, ids = found[(job, destination)]
        if error is not None:
            return False, f"restic check failed: {error}"
        if snapshot_id not in ids:
            return False, f"snapshot {snapshot_id} is not in the repository"
        return True, f"snapshot {snapshot_id} present; restic check passed, {READ_DATA_SUBSET} of the data read back"

    return check
