"""Notifications: a webhook with the run's outcome, and healthchecks-style pings.

Failures are always reported; successes when `notifications.on_success` (or
the job's `notify_on_success`) says so. A notification that cannot be sent is
logged and never fails the backup. URLs often embed tokens, so only their
host is ever logged; bodies are redacted (backupd.redaction) like every
other text that leaves backupd.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from backupd.catalog import SUCCEEDED, BackupView
from backupd.config import Job, Notifications, read_secret_file
from backupd.errors import LabelError
from backupd.redaction import redact, redact_all

log = logging.getLogger(__name__)

LABEL_ERROR = "label-error"  # the status of a report on a discovered job its labels keep from running


@dataclass
class RunReport:
    job: str
    backup_id: str | None
    status: str
    errors: list[str] = field(default_factory=list)
    backup: BackupView | None = None
    warnings: list[str] = field(default_factory=list)  # `on_error: continue` hooks that failed
    label: LabelError | None = None  # a discovered job's broken label: the container and label to fix

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body: what happened, sizes, and why it failed."""
        backup = self.backup
        where = {"container": self.label.container, "label": self.label.label} if self.label else {}
        return {
            "job": self.job,
            "backup_id": self.backup_id,
            "status": self.status,
            "started_at": backup.started_at.isoformat() if backup else None,
            "finished_at": backup.finished_at.isoformat() if backup and backup.finished_at else None,
            "size": backup.size if backup else 0,
            "artifacts": [{"kind": a.kind, "name": a.name, "status": a.status, "size": a.size}
                          for a in backup.artifacts] if backup else [],
            "errors": self.errors,
            "warnings": self.warnings,
            **where,
        }


def host_of(url: str) -> str:
    """The only part of a URL fit for a log line."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def _send(method: str, url: str, body: bytes | None, timeout: float, what: str) -> bool:
    headers = {"User-Agent": "backupd", **({"Content-Type": "application/json"} if body else {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
        return True
    except urllib.error.HTTPError as exc:
        log.warning("%s to %s answered HTTP %d", what, host_of(url), exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        log.warning("%s to %s failed: %s", what, host_of(url), type(reason).__name__
                    if not isinstance(reason, str) else reason)
    return False


def webhook_url(settings: Notifications) -> str | None:
    if settings.webhook_url_file is not None:
        try:
            return read_secret_file(settings.webhook_url_file).get_secret_value()
        except ValueError as exc:
            log.warning("notifications.webhook_url_file: %s", exc)
            return None
    return settings.webhook_url


def wants_success(settings: Notifications, job: Job) -> bool:
    return job.notify_on_success if job.notify_on_success is not None else settings.on_success


def run_started(settings: Notifications, job_name: str) -> None:
    """Tell a healthchecks-style monitor a run began, so it can time it."""
    if settings.ping_url:
        _send("GET", settings.ping_url.rstrip("/") + "/start", None,
              settings.timeout.total_seconds(), f"start ping for job {job_name}")


def run_finished(settings: Notifications, job: Job | None, job_name: str, report: RunReport) -> None:
    """Report a run's outcome (`job` None: a job that does not exist as given, so cannot succeed)."""
    ok = report.status == SUCCEEDED
    timeout = settings.timeout.total_seconds()
    if settings.ping_url:
        url = settings.ping_url.rstrip("/") + ("" if ok else "/fail")
        _send("POST", url, redact("\n".join(report.errors)).encode() or b"ok", timeout,
              f"{'success' if ok else 'failure'} ping for job {job_name}")
    if ok and not report.warnings and (job is None or not wants_success(settings, job)):
        return  # a success with warnings is reported: someone should look at the failed hook
    url = webhook_url(settings)
    if url:
        body = json.dumps(redact_all(report.payload())).encode()
        if _send("POST", url, body, timeout, f"webhook for job {job_name}"):
            log.info("webhook for job %s sent to %s (%s)", job_name, host_of(url), report.status,
                     extra={"job": job_name, "backup_id": report.backup_id})


def label_broken(settings: Notifications, job_name: str, error: LabelError) -> None:
    """A discovered job its labels keep from running is reported as a failed run of it would be
    (webhook, failure ping): nothing else tells anyone it is not backed up."""
    run_finished(settings, None, job_name, RunReport(job_name, None, LABEL_ERROR, [str(error)], label=error))
