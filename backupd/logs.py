"""Logging setup: readable text on a terminal, one JSON object per line otherwise.

Context such as job and backup_id travels as `extra=` fields (usually through
a LoggerAdapter), so every line of a run can be found by its run id. Every line,
whoever logs it (backupd or a library), is redacted here: no recorded secret
(backupd.redaction) is ever written to the log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from backupd.redaction import redact

CONTEXT_FIELDS = ("job", "run_id", "backup_id", "artifact", "destination", "container")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = [f"{k}={getattr(record, k)}" for k in ("job", "run_id", "backup_id") if getattr(record, k, None)]
        return redact(f"{line}  [{' '.join(ctx)}]" if ctx else line)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Log to stderr; stdout is kept for command output (ids, tables, JSON)."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "botocore", "boto3", "paramiko", "apscheduler", "docker", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
