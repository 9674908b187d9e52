"""Jobs declared by containers' `backupd.*` labels, merged under the config's own.

The merged result is an ordinary Config: its `jobs` hold the discovered jobs beside the
configured ones, built from the same models and checked by the same `check_job`, so plan,
steps and catalog cannot tell them apart. The rules, all here:

- `discovery.enabled` must be true, else no label is read;
- a discovered job takes schedule, timezone, format, destinations and retention from
  `discovery:` (retention falling back to the top-level `retention:` as any job's does);
- a job in `jobs:` with the same name wins whole: the labels of its containers are ignored,
  and `list --jobs` says so;
- a bad label breaks its own job (not scheduled; `backupd backup JOB` fails naming the
  container and the label; the daemon notifies once per breakage, see new_breakages) and no other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydantic import ValidationError

from backupd.config import Config, Job, check_job
from backupd.errors import ConfigError, LabelError
from backupd.labels import DATABASE, ENABLE, EXCLUDE, Container, Contribution, read_container

log = logging.getLogger(__name__)

_DEFAULTED = ("schedule", "timezone", "format", "destinations", "retention")


@dataclass
class FoundJob:
    """One job as labels declare it, and what became of it."""

    name: str
    containers: list[str]
    parts: list[Contribution] = field(default_factory=list)
    job: Job | None = None  # None: broken, or overridden by the config
    error: LabelError | None = None
    overridden: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class Discovered:
    """The config with the discovered jobs in it, and what discovery found (for `list --jobs`)."""

    config: Config
    found: dict[str, FoundJob] = field(default_factory=dict)
    containers: list[Container] = field(default_factory=list)  # what the labels were read from

    def errors(self) -> list[LabelError]:
        return [f.error for f in self.found.values() if f.error is not None]

    def broken(self, job: str) -> LabelError | None:
        found = self.found.get(job)
        return found.error if found is not None and not found.overridden else None

    def broken_jobs(self) -> dict[str, LabelError]:
        """Every discovered job a label keeps from running (an overridden one runs from the config)."""
        return {name: error for name in self.found if (error := self.broken(name)) is not None}


def configured(config: Config) -> Config:
    """The config as the operator wrote it, without jobs an earlier discovery added."""
    names = config._discovered_jobs
    if not names:
        return config
    written = config.model_copy(update={"jobs": {k: v for k, v in config.jobs.items() if k not in names}})
    written._discovered_jobs = frozenset()
    return written


def is_discovered(config: Config, job: str) -> bool:
    return job in config._discovered_jobs


def discover(config: Config, containers: Iterable[Container]) -> Discovered:
    """Merge the jobs the containers' labels declare into `config` (as written: see `configured`)."""
    config = configured(config)
    containers = list(containers)
    if not config.discovery.enabled:
        return Discovered(config, containers=containers)
    found: dict[str, FoundJob] = {}
    errors: list[LabelError] = []
    for container in sorted(containers, key=lambda c: c.name):
        try:
            part = read_container(container, config.discovery.secrets_dir)
        except LabelError as exc:
            errors.append(exc)
            name = _job_of_broken(container)
            found.setdefault(name, FoundJob(name, [])).containers.append(container.name)
            found[name].error = found[name].error or exc
            continue
        if part is None:
            continue
        job = found.setdefault(part.job, FoundJob(part.job, []))
        job.containers.append(container.name)
        job.parts.append(part)
        job.notes += part.notes
    jobs = dict(config.jobs)
    for name, job in found.items():
        if name in config.jobs:
            job.overridden = True
            job.notes.append(f"jobs.{name} in the config wins: the labels of {', '.join(job.containers)} "
                             "are ignored")
            continue
        if job.error is None:
            try:
                job.job = assemble(config, job)
            except LabelError as exc:
                job.error = exc
        if job.job is not None:
            jobs[name] = job.job
    merged = config.model_copy(update={"jobs": jobs})
    merged._discovered_jobs = frozenset(n for n, j in found.items() if j.job is not None)
    return Discovered(merged, found, containers)


def _job_of_broken(container: Container) -> str:
    """Which job a container with a bad label belongs to, as far as its labels still tell."""
    from backupd.labels import _job_name

    try:
        return _job_name(container, container.labels)[0]
    except LabelError:
        return container.name


def assemble(config: Config, found: FoundJob) -> Job:
    """The Job the containers' contributions make, with the discovery defaults; checked like a
    configured job, its errors pinned on the container and label they came from."""
    defaults = config.discovery
    data: dict[str, Any] = {k: getattr(defaults, k) for k in _DEFAULTED if getattr(defaults, k) is not None}
    data["volumes"] = [sel for part in found.parts for sel, _ in part.volumes]
    data["databases"] = [spec for part in found.parts for spec, _ in part.databases]
    data["stop_containers"] = [sel for part in found.parts for sel, _ in part.stop]
    try:
        job = Job.model_validate(data)
        check_job(config, found.name, job)
    except (ValueError, ValidationError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        path = getattr(exc, "path", f"jobs.{found.name}")
        with_db = [p.container for p in found.parts if p.databases]
        with_excludes = [p.container for p in found.parts if any(sel.exclude for sel, _ in p.volumes)]
        if ".databases" in path and with_db:
            container, label = with_db[0], DATABASE
        elif ".exclude" in path and with_excludes:
            container, label = with_excludes[0], EXCLUDE
        else:
            container, label = found.containers[0], ENABLE
        raise LabelError(container, label, f"job {found.name}: {message}") from None
    return job


def sources(config: Config, name: str, found: FoundJob | None) -> dict[str, Any]:
    """Where each setting of a job came from: config, a label on a container, a discovery default."""
    if found is None or found.job is None:
        job = config.jobs[name]
        given = job.model_fields_set
        out: dict[str, Any] = {k: f"config (jobs.{name}.{k})" if k in given else "default" for k in _DEFAULTED}
        if "retention" not in given and config.retention is not None:
            out["retention"] = "config (retention)"
        for key in ("volumes", "databases", "stop_containers"):
            out[key] = [f"config (jobs.{name}.{key}[{i}])" for i in range(len(getattr(job, key)))]
        return out
    given = config.discovery.model_fields_set
    out = {k: f"discovery default (discovery.{k})" if k in given else "default" for k in _DEFAULTED}
    if "retention" not in given and config.retention is not None:
        out["retention"] = "config (retention)"
    out["volumes"] = [src for part in found.parts for _, src in part.volumes]
    out["databases"] = [src for part in found.parts for _, src in part.databases]
    out["stop_containers"] = [src for part in found.parts for _, src in part.stop]
    return out


def describe(discovered: Discovered) -> list[dict[str, Any]]:
    """Every job, configured or discovered, with its settings and their sources (`list --jobs`)."""
    config = discovered.config
    rows = []
    names = list(config.jobs) + [n for n in discovered.found if n not in config.jobs]
    for name in names:
        found = discovered.found.get(name)
        job = config.jobs.get(name)
        origin = "config" if found is None or found.overridden else "labels"
        row: dict[str, Any] = {"job": name, "origin": origin,
                               "containers": found.containers if found else [],
                               "error": str(found.error) if found and found.error and not found.overridden else None,
                               "notes": found.notes if found else []}
        if job is not None:
            settings = sources(config, name, None if origin == "config" else found)
            retention = job.retention or config.retention
            row["settings"] = {
                "schedule": {"value": job.schedule, "from": settings["schedule"]},
                "timezone": {"value": job.timezone, "from": settings["timezone"]},
                "format": {"value": job.format, "from": settings["format"]},
                "destinations": {"value": job.destinations or list(config.destinations),
                                 "from": settings["destinations"]},
                "retention": {"value": retention.model_dump(mode="json", exclude_defaults=True) if retention else None,
                              "from": settings["retention"]},
                "volumes": [{"value": v.model_dump(by_alias=True, exclude_defaults=True), "from": src}
                            for v, src in zip(job.volumes, settings["volumes"])],
                "databases": [{"value": {"name": d.name, "type": d.type, "container": d.container},
                               "from": src} for d, src in zip(job.databases, settings["databases"])],
                "stop_containers": [{"value": s.model_dump(exclude_none=True), "from": src}
                                    for s, src in zip(job.stop_containers, settings["stop_containers"])],
            }
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the engine side


def read_containers(client: Any) -> list[Container]:
    """Every container that carries `backupd.enable`, running or not (a stopped one's volumes
    still hold data). One listing call: its summaries carry names, labels and mounts, where
    inspecting each container took a request per container (2.4 s for 200 here)."""
    from backupd.labels import ENABLE as enable

    found = []
    image_labels: dict[str, dict[str, str]] = {}
    for c in client.api.containers(all=True, filters={"label": enable}):
        mounts = c.get("Mounts") or []
        labels = dict(c.get("Labels") or {})
        image = c.get("ImageID", "")
        if image not in image_labels:
            image_labels[image] = _image_labels(client, image)
        found.append(Container(
            name=_name(c), labels=labels,
            inherited=frozenset(k for k, v in image_labels[image].items() if labels.get(k) == v),
            volumes=tuple(m["Name"] for m in mounts if m.get("Type") == "volume" and m.get("Name")),
            binds=tuple(m["Source"] for m in mounts if m.get("Type") == "bind"
                        and m.get("Source") != "/var/run/docker.sock")))
    return found


def _name(summary: dict[str, Any]) -> str:
    """The container's own name: a legacy link adds aliases such as /web/db beside /db."""
    names = [n.lstrip("/") for n in summary.get("Names") or []]
    return next((n for n in names if "/" not in n), names[0] if names else summary["Id"][:12])


def _image_labels(client: Any, image: str) -> dict[str, str]:
    from docker.errors import DockerException

    try:
        return dict(client.images.get(image).labels or {})
    except DockerException:  # removed meanwhile: judge every label as the container's own
        return {}


def new_breakages(before: Discovered | None, after: Discovered) -> list[tuple[str, LabelError]]:
    """(job, error) of each discovered job `after` keeps from running for a reason `before` did
    not already have: a breakage is reported once, not at every refresh that finds it again."""
    seen = {str(e) for e in before.broken_jobs().values()} if before else set()
    return [(name, error) for name, error in after.broken_jobs().items() if str(error) not in seen]


def log_changes(before: Discovered | None, after: Discovered) -> None:
    """Log label errors and notes when they appear (not at every refresh)."""
    seen = {str(e) for e in before.errors()} if before else set()
    for error in after.errors():
        if str(error) not in seen:
            log.error("discovered job not run: %s", error, extra={"container": error.container})
    old_notes = {n for f in before.found.values() for n in f.notes} if before else set()
    for found in after.found.values():
        for note in found.notes:
            if note not in old_notes:
                log.warning("job %s: %s", found.name, note, extra={"job": found.name})


def unknown_job(config: Config, job: str) -> ConfigError:
    known = ", ".join(sorted(config.jobs)) or "none"
    return ConfigError(f"job '{job}' is not defined in the config nor declared by container labels "
                       f"(jobs: {known})")
