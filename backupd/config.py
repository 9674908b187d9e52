"""The config file: schema, loading, ${ENV} interpolation and *_file secrets.

The YAML is parsed once into typed, frozen objects; the rest of backupd never
sees raw dicts. Every validation error names the key path
(``jobs.nightly.volumes[1]: ...``) so an operator can find it at 3 a.m.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from backupd.errors import ConfigError
from backupd.redaction import HOOK_VALUE_MIN, remember

DEFAULT_CONFIG_PATH = "/etc/backupd/backupd.yml"
DEFAULT_CATALOG = "sqlite:////var/lib/backupd/catalog.db"
DEFAULT_LOCAL_PATH = "/backups"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
def parse_duration(text: str | int | float) -> timedelta:
    """'90s', '15m', '12h', '7d', '2w', '1d12h' (or a number of seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return timedelta(seconds=text)
    from backupd.retention import parse_duration as parse_text

    return parse_text(str(text).strip())


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]

MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str | int) -> int:
    """'256m', '1g', '512k' or a number of bytes (Docker's units: powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([bkmg]?)\s*", str(text).lower())
    if match is None:
        raise ValueError(f"'{text}' is not a size: use bytes or a number with k, m or g (e.g. 256m)")
    return int(match[1]) * _UNITS[match[2]]


def _helper_memory(value: int | None) -> int | None:
    if value is not None and value < 32 * MiB:
        raise ValueError("must be at least 32m: tar and its buffers need room (null: no limit)")
    return value


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    """Strict base: unknown keys are typos, and typos in a backup config lose data."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret_file(path: str | Path) -> SecretStr:
    """Read a secret from a file (Docker/Compose secrets), without its trailing newline.

    The value is recorded for redaction: it never appears in logs, errors or records.
    """
    try:
        value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read secret file '{path}': {exc.strerror}") from None
    remember(value)
    return SecretStr(value)


def _secret_from_file(model: Any, field: str) -> Any:
    """Fill `field` from `field_file` when given; both at once is ambiguous."""
    file_value = getattr(model, f"{field}_file")
    if file_value is None:
        return model
    if getattr(model, field) is not None and field in model.model_fields_set:
        raise ValueError(f"set either {field} or {field}_file, not both")  # (not: filled from the file before)
    object.__setattr__(model, field, read_secret_file(file_value))
    return model


# ---------------------------------------------------------------- destinations


class _RepositoryPassword(_Model):
    """The password of the restic repositories a destination (or job) holds (repository mode)."""

    repository_password: SecretStr | None = None
    repository_password_file: Path | None = None

    @model_validator(mode="after")
    def _repository_password(self) -> Any:
        return _secret_from_file(self, "repository_password")


class LocalDestination(_RepositoryPassword):
    type: Literal["local"]
    path: Path = Path(DEFAULT_LOCAL_PATH)


class S3Destination(_RepositoryPassword):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    storage_class: str | None = None
    server_side_encryption: str | None = None  # "AES256" or "aws:kms"
    sse_kms_key_id: str | None = None
    part_size_mb: int = Field(default=5, ge=5, le=5120)
    concurrency: int = Field(default=4, ge=1, le=64)  # parts uploaded at once

    @model_validator(mode="after")
    def _secrets(self) -> "S3Destination":
        return _secret_from_file(self, "secret_access_key")


class SftpDestination(_RepositoryPassword):
    type: Literal["sftp"]
    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str
    path: str = "."
    key_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    known_hosts: Path | None = None
    host_key_fingerprint: str | None = None  # "SHA256:..." as ssh-keygen -l prints

    @model_validator(mode="after")
    def _checks(self) -> "SftpDestination":
        _secret_from_file(self, "password")
        if self.key_file is None and self.password is None:
            raise ValueError("set key_file or password_file to log in")
        if self.known_hosts is None and self.host_key_fingerprint is None:
            raise ValueError(
                "set known_hosts or host_key_fingerprint: unknown host keys are never accepted"
            )
        return self


Destination = Annotated[
    Union[LocalDestination, S3Destination, SftpDestination], Field(discriminator="type")
]

# ---------------------------------------------------------------- job parts


class VolumeSelector(_Model):
    """One entry of `volumes:`: a name, or exactly one of label/compose_project/container/path."""

    name: str | None = None
    label: str | None = None
    compose_project: str | None = None
    container: str | None = None
    path: str | None = None
    as_name: str | None = Field(default=None, alias="as")
    # GNU tar patterns anchored at the volume's root (backupd.excludes); the job's `exclude:` adds to them.
    exclude: list[str] = []

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return _exclude_patterns(value)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "VolumeSelector":
        given = [k for k in ("name", "label", "compose_project", "container", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of name, label, compose_project, container, path"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError(f"path '{self.path}' must be absolute (a path on the Docker host)")
        if self.label is not None and not re.match(r"^[^=\s]+(=[^\s]*)?$", self.label):
            raise ValueError(f"label '{self.label}' must be key or key=value")
        if self.as_name is not None and not NAME_RE.match(self.as_name):
            raise ValueError(f"as '{self.as_name}' must match {NAME_RE.pattern}")
        return self


def _exclude_patterns(value: list[str]) -> list[str]:
    from backupd.excludes import normalize

    return [normalize(p) for p in value]


class ContainerSelector(_Model):
    name: str | None = None
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "ContainerSelector":
        if (self.name is None) == (self.label is None):
            raise ValueError("give exactly one of name or label")
        return self


class DatabaseSpec(_Model):
    name: str
    type: Literal["postgres", "postgresql", "mysql", "mariadb", "sqlite", "redis"]
    container: str | None = None
    path: str | None = None  # sqlite: the database file, as its container sees it
    image: str | None = None  # sqlite: image of the helper that copies it (python3); None: helper_image
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    database: str | list[str] = "all"
    options: list[str] = []
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _checks(self) -> "DatabaseSpec":
        _secret_from_file(self, "password")
        if not NAME_RE.match(self.name):
            raise ValueError(f"name '{self.name}' must match {NAME_RE.pattern}")
        if (self.container is None) == (self.host is None):
            raise ValueError("give exactly one of container (docker exec) or host (network)")
        if self.type == "sqlite":
            if self.container is None:
                raise ValueError("sqlite: give the container whose volume holds the file (host: is not supported)")
            if not self.path or not self.path.startswith("/") or "\0" in self.path or self.path.endswith("/"):
                raise ValueError("sqlite: path must be the absolute path of the database file inside the container")
            if self.options:
                raise ValueError("sqlite: options do not apply (the copy is made with SQLite's backup API)")
        elif self.path is not None or self.image is not None:
            raise ValueError("path and image apply to type: sqlite only")
        if self.type in ("sqlite", "redis") and self.database != "all":
            raise ValueError(f"{self.type}: database does not apply (the whole "
                             f"{'file' if self.type == 'sqlite' else 'server'} is copied)")
        return self

    @property
    def kind(self) -> str:
        """postgres, mysql, sqlite or redis: mariadb and postgresql are aliases."""
        return {"postgresql": "postgres", "mariadb": "mysql"}.get(self.type, self.type)


class Hook(_Model):
    command: list[str] | str
    container: str | None = None  # None: run inside backupd itself
    timeout: Duration = timedelta(minutes=5)
    on_error: Literal["fail", "continue"] = "fail"

    @property
    def argv(self) -> list[str]:
        """A string command runs through sh -c; a list is exec'd as is."""
        return ["sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)


class Hooks(_Model):
    before: list[Hook] = []
    after: list[Hook] = []


class Compression(_Model):
    algorithm: Literal["zstd", "gzip"] = "zstd"
    level: int | None = None  # zstd default 3, gzip default 6
    threads: int = 0  # zstd worker threads; 0 = one per core

    @model_validator(mode="after")
    def _level_range(self) -> "Compression":
        low, high = (1, 19) if self.algorithm == "zstd" else (1, 9)
        if self.level is not None and not low <= self.level <= high:
            raise ValueError(f"level {self.level} is out of range {low}..{high} for {self.algorithm}")
        return self

    @property
    def effective_level(self) -> int:
        return self.level if self.level is not None else (3 if self.algorithm == "zstd" else 6)


class Encryption(_Model):
    age_recipients: list[str] = []
    age_recipients_file: Path | None = None

    @model_validator(mode="after")
    def _some_recipient(self) -> "Encryption":
        if not self.age_recipients and self.age_recipients_file is None:
            raise ValueError("give age_recipients or age_recipients_file")
        return self


class Retention(_Model):
    keep_last: int | None = Field(default=None, ge=0)
    keep_hourly: int | None = Field(default=None, ge=0)
    keep_daily: int | None = Field(default=None, ge=0)
    keep_weekly: int | None = Field(default=None, ge=0)
    keep_monthly: int | None = Field(default=None, ge=0)
    keep_yearly: int | None = Field(default=None, ge=0)
    keep_within: Duration | None = None
    keep_failed: Duration | None = None
    schedule: str | None = None
    # A backup more than this share smaller than the median of the job's last few successes is
    # suspicious, and retention deletes nothing while it is the newest (0: no guard).
    shrinkage: float = Field(default=0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _keeps_something(self) -> "Retention":
        from backupd.retention import Policy, policy_problems

        problems = policy_problems(Policy.from_config(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Job(_RepositoryPassword):
    schedule: str | None = None
    # archive: a compressed (and optionally age-encrypted) tar per volume and run;
    # repository: a restic snapshot per volume and run in a deduplicated repository.
    format: Literal["archive", "repository"] = "archive"
    timezone: str = "UTC"
    jitter: Duration | None = None
    volumes: list[VolumeSelector] = []
    exclude: list[str] = []  # for every volume of the job, besides each volume's own
    databases: list[DatabaseSpec] = []
    stop_containers: list[ContainerSelector] = []
    hooks: Hooks = Hooks()
    destinations: list[str] | None = None  # None: every configured destination
    retention: Retention | None = None
    compression: Compression | None = None
    encryption: Encryption | None = None
    verify_schedule: str | None = None
    notify_on_success: bool | None = None

    @field_validator("exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        return _exclude_patterns(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone '{value}'") from None
        return value

    @field_validator("schedule", "verify_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            validate_cron(value)
        return value


def validate_cron(expr: str) -> None:
    """Five-field cron only: a six-field one silently means seconds elsewhere."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"schedule '{expr}' must have 5 fields (minute hour day month weekday)")
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr)
    except ValueError as exc:
        raise ValueError(f"schedule '{expr}' is not valid cron: {exc}") from None


class Discovery(_Model):
    """Defaults for the jobs containers declare with `backupd.*` labels (backupd.discovery).

    Labels say what to back up; where, when and how long to keep it stays the operator's
    call, here. Off unless enabled: a label on a container must not start backups no
    operator asked for."""

    enabled: bool = False
    schedule: str | None = None  # None: discovered jobs run only on `backupd backup JOB`
    timezone: str = "UTC"
    format: Literal["archive", "repository"] = "archive"
    destinations: list[str] | None = None  # None: every configured destination
    retention: Retention | None = None  # None: the top-level retention
    # The only directory a `backupd.database.password_file` label may name a file in (None: none).
    secrets_dir: Path | None = None

    _cron = field_validator("schedule")(Job._cron.__func__)  # type: ignore[attr-defined]
    _known_timezone = field_validator("timezone")(Job._known_timezone.__func__)  # type: ignore[attr-defined]


class Http(_Model):
    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)
    metrics_token: SecretStr | None = None  # /metrics then asks for `Authorization: Bearer <token>`
    metrics_token_file: Path | None = None

    @model_validator(mode="after")
    def _secrets(self) -> "Http":
        return _secret_from_file(self, "metrics_token")

    def token(self) -> str | None:
        return self.metrics_token.get_secret_value() if self.metrics_token else None


class Notifications(_Model):
    webhook_url: str | None = None
    webhook_url_file: Path | None = None
    ping_url: str | None = None
    on_success: bool = False
    timeout: Duration = timedelta(seconds=10)


class Scheduler(_Model):
    misfire_grace: Duration = timedelta(hours=1)
    stop_grace: Duration = timedelta(minutes=5)


class Config(_Model):
    catalog: str = DEFAULT_CATALOG
    helper_image: str | None = None  # None: backupd's own image when it runs in a container
    # Memory limit of helper containers; their page cache counts too (see config/backupd.example.yml).
    helper_memory: Annotated[ByteSize | None, AfterValidator(_helper_memory)] = 256 * MiB
    # Image that runs restic for repository-mode jobs (needs restic and glibc); None: helper_image.
    repository_image: str | None = None
    destinations: dict[str, Destination] = Field(
        default_factory=lambda: {"local": LocalDestination(type="local")}
    )
    jobs: dict[str, Job] = {}
    compression: Compression = Compression()
    encryption: Encryption | None = None
    retention: Retention | None = None
    http: Http = Http()
    notifications: Notifications = Notifications()
    scheduler: Scheduler = Scheduler()
    discovery: Discovery = Discovery()
    # Names of the jobs backupd.discovery added from container labels (empty as loaded).
    _discovered_jobs: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @model_validator(mode="after")
    def _cross_references(self) -> "Config":
        for name in list(self.destinations) + list(self.jobs):
            if not NAME_RE.match(name):
                raise ValueError(f"name '{name}' must match {NAME_RE.pattern}")
        for i, dest in enumerate(self.discovery.destinations or []):
            _check_destination(self, f"discovery.destinations[{i}]", dest)
        if self.discovery.format == "repository":
            _check_repository_discovery(self)
        for job_name, job in self.jobs.items():
            check_job(self, job_name, job)
        return self

    def job(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise ConfigError(f"job '{name}' is not defined in the config (jobs: {known})") from None

    def job_destinations(self, job_name: str) -> dict[str, Any]:
        names = self.jobs[job_name].destinations or list(self.destinations)
        return {n: self.destinations[n] for n in names}

    def job_compression(self, job_name: str) -> Compression:
        return self.jobs[job_name].compression or self.compression

    def job_encryption(self, job_name: str) -> Encryption | None:
        return self.jobs[job_name].encryption or self.encryption

    def job_retention(self, job_name: str) -> Retention | None:
        return self.jobs[job_name].retention or self.retention

    def repository_password(self, job_name: str, destination: str) -> SecretStr:
        """The job's own password, else the destination's (checked to exist when loaded)."""
        own = self.jobs[job_name].repository_password
        found = own if own is not None else self.destinations[destination].repository_password
        if found is None:
            raise ConfigError(f"jobs.{job_name}.repository_password: not set (nor on destination {destination})")
        return found


def check_job(config: "Config", job_name: str, job: Job) -> None:
    """What a job must satisfy beyond its own keys; shared by configured and discovered jobs.

    Raises a ValueError whose `path` is the key path (jobs.NAME...)."""
    for i, dest in enumerate(job.destinations or []):
        _check_destination(config, f"jobs.{job_name}.destinations[{i}]", dest)
    if not job.volumes and not job.databases:
        raise _KeyedError(f"jobs.{job_name}", "job backs up nothing: add volumes or databases")
    if job.format == "repository":
        _check_repository_job(config, job_name, job)
    names = [d.name for d in job.databases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _KeyedError(f"jobs.{job_name}.databases", f"duplicate name '{dupes[0]}'")


def _check_destination(config: "Config", path: str, dest: str) -> None:
    if dest not in config.destinations:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise _KeyedError(path, f"destination '{dest}' is not defined (defined: {known})")


REPOSITORY_DESTINATIONS = ("local", "s3", "sftp")


def _check_repository_excludes(where: str, job: Job) -> None:
    """Every exclude pattern of a repository job must have a restic translation that leaves out
    exactly what tar would (backupd.excludes.restic_pattern)."""
    from backupd.excludes import restic_pattern

    listed = [(f"{where}.exclude[{i}]", p) for i, p in enumerate(job.exclude)]
    listed += [(f"{where}.volumes[{j}].exclude[{i}]", p) for j, v in enumerate(job.volumes)
               for i, p in enumerate(v.exclude)]
    for path, pattern in listed:
        try:
            restic_pattern(pattern, "/")
        except ValueError as exc:
            raise _KeyedError(path, str(exc)) from None


def _check_repository_job(config: "Config", job_name: str, job: Job) -> None:
    """What repository mode needs: a password for every destination, restic's own encryption
    instead of age, and destinations restic is driven on."""
    where = f"jobs.{job_name}"
    if job.encryption is not None:
        raise _KeyedError(f"{where}.encryption", "a repository is encrypted by restic with its password: "
                                                 "age encryption applies to format: archive only")
    _check_repository_excludes(where, job)
    for name in job.destinations or list(config.destinations):
        dest = config.destinations[name]
        if dest.type not in REPOSITORY_DESTINATIONS:
            raise _KeyedError(f"{where}.destinations",
                              f"destination '{name}' is {dest.type}: format: repository supports "
                              f"{', '.join(REPOSITORY_DESTINATIONS)}")
        if dest.type == "sftp" and dest.key_file is None:
            # restic reaches SFTP through OpenSSH's ssh, which would need a terminal (or an askpass
            # program) for a password; a key file reaches it as a file in the helper.
            raise _KeyedError(f"destinations.{name}.key_file",
                              f"format: repository (job {job_name}) logs in to SFTP with a key: "
                              f"set key_file (a password login works for format: archive only)")
        if job.repository_password is None and dest.repository_password is None:
            raise _KeyedError(f"{where}.repository_password",
                              f"format: repository needs a password: set repository_password_file here "
                              f"or on destination '{name}'")


def _check_repository_discovery(config: "Config") -> None:
    """Discovered jobs have no password of their own: each destination must hold one."""
    for name in config.discovery.destinations or list(config.destinations):
        dest = config.destinations[name]
        if dest.type not in REPOSITORY_DESTINATIONS:
            raise _KeyedError("discovery.destinations", f"destination '{name}' is {dest.type}: format: repository "
                                                        f"supports {', '.join(REPOSITORY_DESTINATIONS)}")
        if dest.repository_password is None:
            raise _KeyedError("discovery.format", f"format: repository needs a password: set "
                                                  f"repository_password_file on destination '{name}'")


class _KeyedError(ValueError):
    """A cross-reference error that knows its own key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# ---------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def interpolate(value: Any, env: dict[str, str], path: str = "",
                expanded: list[tuple[str, str]] | None = None) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; $$ is a literal $.

    Each substitution is appended to `expanded` as (key path, value).
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env, _join(path, str(k)), expanded) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", expanded) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name, default = match.group(2), match.group(3)
        if name in env:
            result = env[name]
        elif default is not None:
            result = default
        else:
            raise ConfigError(f"{path}: environment variable '{name}' is not set")
        if expanded is not None:
            expanded.append((path, result))
        return result

    return _ENV_RE.sub(substitute, value)


_HOOK_COMMAND = re.compile(r"^jobs\..+\.hooks\.(before|after)\[\d+\]\.command(\[\d+\])?$")


def _secret_values(node: Any) -> Iterator[str]:
    """Every SecretStr value in a parsed config (password fields and their *_file twins)."""
    if isinstance(node, SecretStr):
        yield node.get_secret_value()
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _secret_values(getattr(node, name))
    elif isinstance(node, dict):
        for item in node.values():
            yield from _secret_values(item)
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _secret_values(item)


def remember_secrets(config: "Config", expanded: Iterable[tuple[str, str]] = ()) -> None:
    """Record for redaction every secret the config resolved, and what ${VAR}s put into hook commands
    (a hook is where an operator passes a token to curl or a password to a tool)."""
    for value in _secret_values(config):
        remember(value)
    remember(config.notifications.webhook_url)  # its URL is its credential
    try:
        from sqlalchemy.engine import make_url

        remember(make_url(config.catalog).password)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read is reported when it is opened
        pass
    for path, value in expanded:
        if _HOOK_COMMAND.match(path) and len(value) >= HOOK_VALUE_MIN:
            remember(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key_path(loc: tuple[Any, ...], data: Any) -> str:
    """Render a pydantic error location as jobs.x.volumes[1], skipping union tags."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and item == node.get("type"):
            continue  # discriminator tag, not a key
        if "[" in str(item) or "(" in str(item):
            continue  # validator wrapper names
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def _first_error(exc: ValidationError, data: Any) -> str:
    err = exc.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, _KeyedError):
        return f"{original.path}: {original.message}"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key (check spelling)"
    elif err["type"] == "missing":
        message = "required key is missing"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{_key_path(tuple(err['loc']), data)}: {message}{suffix}"


def parse_config(data: Any, source: str = "config", env: dict[str, str] | None = None) -> Config:
    """Validate already-parsed YAML data; errors name the source and key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    expanded: list[tuple[str, str]] = []
    try:
        data = interpolate(data, dict(os.environ) if env is None else env, expanded=expanded)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc, data)}") from None
    remember_secrets(config, expanded)
    return config


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate the config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist (set --config or BACKUPD_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    return parse_config(data, str(path), env)


def default_config_path() -> str:
    return os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG_PATH
