"""What a container's `backupd.*` labels ask for, as the config's own models.

Pure: a container's name, labels and mounts in, a `Contribution` (volume selectors,
database specs, containers to stop) out, or a LabelError naming the container and the
label. The models are the ones `jobs:` uses, so a discovered job is validated the same
way and is indistinguishable from a configured one downstream.

Labels are readable by anyone who can inspect a container, so no label may carry a
secret: a password is refused, `backupd.database.password_file` names a file instead.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import SecretStr, ValidationError

from backupd.config import NAME_RE, ContainerSelector, DatabaseSpec, VolumeSelector
from backupd.errors import LabelError
from backupd.excludes import normalize

PREFIX = "backupd."
ENABLE = PREFIX + "enable"
VOLUMES = PREFIX + "volumes"
STOP = PREFIX + "stop"
DATABASE = PREFIX + "database"
EXCLUDE = PREFIX + "exclude"
JOB = PREFIX + "job"
KNOWN = (ENABLE, VOLUMES, STOP, DATABASE, EXCLUDE, JOB)
RESERVED = ("backupd.helper", "backupd.owner")  # backupd's own helper containers carry these
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
# Set by the container itself, never by a label: the dump runs in the labelled container.
_NOT_OPTIONS = ("type", "container", "host")


@dataclass(frozen=True)
class Container:
    """What discovery needs to know of a container."""

    name: str
    labels: Mapping[str, str]
    volumes: tuple[str, ...] = ()  # names of the named volumes it mounts
    binds: tuple[str, ...] = ()  # host paths it bind-mounts
    # Labels its image set (and the container did not change): an image's own `backupd.*`
    # labels are the image author's, not a request to this backupd, so unknown ones are ignored.
    inherited: frozenset[str] = frozenset()


@dataclass
class Contribution:
    """What one container's labels add to its job, each part with where it came from."""

    job: str
    container: str
    job_source: str  # which label (or Compose's) named the job
    volumes: list[tuple[VolumeSelector, str]] = field(default_factory=list)
    databases: list[tuple[DatabaseSpec, str]] = field(default_factory=list)
    stop: list[tuple[ContainerSelector, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # asked for, not (yet) done: shown, not fatal


def opted_in(labels: Mapping[str, str]) -> bool:
    """A container takes part once it carries `backupd.enable` (true or not: a typo must show)."""
    return ENABLE in labels


def read_container(container: Container, secrets_dir: Path | None = None) -> Contribution | None:
    """The container's contribution to its job; None when `backupd.enable=false`.
    `secrets_dir`: the only directory a label may name a secret file in (discovery.secrets_dir).

    Raises LabelError for the first bad label."""
    labels = {k: v for k, v in container.labels.items() if k.startswith(PREFIX) and k not in RESERVED}
    for key in sorted(labels):
        if key not in KNOWN and not key.startswith(DATABASE + ".") and key not in container.inherited:
            raise LabelError(container.name, key, f"unknown label (known: {', '.join(KNOWN)}, "
                                                  f"{DATABASE}.<option>)")
    if not _flag(container, ENABLE, labels.get(ENABLE)):
        return None
    job, job_source = _job_name(container, labels)
    part = Contribution(job, container.name, job_source)
    on = f"on container {container.name}"
    if DATABASE in labels:
        part.databases.append((_database(container, labels, secrets_dir), f"label {DATABASE} {on}"))
    elif any(k.startswith(DATABASE + ".") for k in labels):
        key = min(k for k in labels if k.startswith(DATABASE + "."))
        raise LabelError(container.name, key, f"database options need {DATABASE}=<kind>")
    if VOLUMES in labels:
        part.volumes += [(s, f"label {VOLUMES} {on}") for s in _named_volumes(container, labels[VOLUMES])]
    elif DATABASE not in labels:  # a database's dump is its backup; its files only if named
        if not container.volumes and not container.binds:
            raise LabelError(container.name, ENABLE, "the container mounts no volume or host path: "
                                                     f"name a database with {DATABASE}=<kind>")
        part.volumes.append((VolumeSelector(container=container.name), f"label {ENABLE} {on}"))
    if EXCLUDE in labels:
        part.volumes = _with_excludes(container, labels[EXCLUDE], part.volumes)
    if _flag(container, STOP, labels.get(STOP)):
        part.stop.append((ContainerSelector(name=container.name), f"label {STOP} {on}"))
    return part


def _flag(container: Container, key: str, value: str | None) -> bool:
    if value is None:
        return False
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise LabelError(container.name, key, f"'{value}' is not true or false")
    return text == "true"


def _job_name(container: Container, labels: Mapping[str, str]) -> tuple[str, str]:
    """`backupd.job`, else the Compose project, else the container's own name."""
    if JOB in labels:
        name, source = labels[JOB].strip(), f"label {JOB} on container {container.name}"
        if not NAME_RE.match(name):
            raise LabelError(container.name, JOB, f"job name '{name}' must match {NAME_RE.pattern}")
        return name, source
    project = container.labels.get(COMPOSE_PROJECT)
    if project and NAME_RE.match(project):
        return project, f"Compose project of container {container.name}"
    return container.name, f"name of container {container.name}"


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _named_volumes(container: Container, value: str) -> list[VolumeSelector]:
    """Each name is one of the container's volumes: its full name, or the name in the compose
    file (Compose prefixes it with the project)."""
    names = _split(value)
    if not names:
        raise LabelError(container.name, VOLUMES, "names no volume")
    project = container.labels.get(COMPOSE_PROJECT)
    chosen = []
    for name in names:
        full = name if name in container.volumes else f"{project}_{name}" if project else None
        if full not in container.volumes:
            mounted = ", ".join(container.volumes) or "none"
            raise LabelError(container.name, VOLUMES,
                             f"the container mounts no volume '{name}' (it mounts: {mounted})")
        chosen.append(VolumeSelector(name=full))
    return chosen


def _with_excludes(container: Container, value: str,
                   volumes: list[tuple[VolumeSelector, str]]) -> list[tuple[VolumeSelector, str]]:
    """`backupd.exclude` carried into each of the container's volume selectors, its patterns
    checked by the same rules as a config file's `exclude:` (backupd.excludes)."""
    patterns = _split(value)
    if not patterns:
        raise LabelError(container.name, EXCLUDE, "names no pattern")
    try:
        patterns = [normalize(p) for p in patterns]
    except ValueError as exc:
        raise LabelError(container.name, EXCLUDE, str(exc)) from None
    return [(VolumeSelector.model_validate({**sel.model_dump(by_alias=True, exclude_none=True),
                                            "exclude": patterns}), source) for sel, source in volumes]


def _database(container: Container, labels: Mapping[str, str], secrets_dir: Path | None) -> DatabaseSpec:
    """`backupd.database=<kind>` and `backupd.database.<option>=value` as a DatabaseSpec:
    the kind is its `type`, each option one of its keys, so every kind it knows works."""
    kind = labels[DATABASE].strip()
    kinds = _literal_values(DatabaseSpec.model_fields["type"].annotation)
    if kind not in kinds:
        raise LabelError(container.name, DATABASE, f"'{kind}' is not a database kind ({', '.join(kinds)})")
    spec: dict[str, Any] = {
        "name": container.labels.get(COMPOSE_SERVICE) or container.name, "type": kind,
        "container": container.name}
    for key in sorted(labels):
        if not key.startswith(DATABASE + "."):
            continue
        option = key[len(DATABASE) + 1:]
        info = DatabaseSpec.model_fields.get(option)
        if info is None or option in _NOT_OPTIONS:
            known = sorted(k for k in DatabaseSpec.model_fields if k not in _NOT_OPTIONS
                           and not _is_secret(DatabaseSpec.model_fields[k].annotation))
            raise LabelError(container.name, key, f"'{option}' is not an option of {DATABASE} "
                                                  f"(options: {', '.join(known)})")
        if _is_secret(info.annotation):
            raise LabelError(container.name, key,
                             "a secret in a label is readable by anyone who can inspect the container: "
                             f"put it in a file backupd can read and name it with {key}_file")
        spec[option] = _option_value(info.annotation, labels[key])
        if option.endswith("_file"):
            spec[option] = _secret_file(container, key, spec[option], secrets_dir)
    try:
        return DatabaseSpec.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"] if isinstance(p, str)]
        label = f"{DATABASE}.{loc[0]}" if loc and loc[0] in spec and loc[0] not in ("name", "type") else DATABASE
        message = err["msg"].removeprefix("Value error, ")
        if label == DATABASE and loc and loc[0] == "name":
            message = f"database name: {message} (set {DATABASE}.name)"
        raise LabelError(container.name, label, message) from None


def _secret_file(container: Container, key: str, value: Any, secrets_dir: Path | None) -> Path:
    """A secret file a label names, only inside the operator's `discovery.secrets_dir`: whoever
    labels a container must not make backupd read its other secrets and hand them to that
    container's tools. The file is read right after this check (DatabaseSpec)."""
    if secrets_dir is None:
        raise LabelError(container.name, key, "a label may name a secret file only inside "
                                              "discovery.secrets_dir, which is not set")
    path = Path(str(value))
    resolved = (secrets_dir / path).resolve() if not path.is_absolute() else path.resolve()
    if not resolved.is_relative_to(secrets_dir.resolve()):
        raise LabelError(container.name, key, f"'{value}' is not inside discovery.secrets_dir ({secrets_dir})")
    return resolved


def _literal_values(annotation: Any) -> list[str]:
    return [str(v) for v in typing.get_args(annotation)]


def _type_args(annotation: Any) -> tuple[Any, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _is_secret(annotation: Any) -> bool:
    return any(arg is SecretStr for arg in _type_args(annotation))


def _option_value(annotation: Any, value: str) -> Any:
    """A label is one string: a comma-separated one becomes a list where the key takes a list."""
    takes_list = any(typing.get_origin(arg) is list for arg in _type_args(annotation))
    takes_str = any(arg is str for arg in _type_args(annotation))
    if takes_list and ("," in value or not takes_str):
        return _split(value)
    return value.strip()
