"""The one owner of secrets that must not leave the process: who records them and how they are masked.

Recorded as they are resolved: config loading records every secret value it read
(password fields, `*_file` contents, the catalog URL's password, the webhook URL, the
metrics token) and the values of `${VAR}`s expanded into hook commands; the database
code records a password it takes from a container's environment. Applied where text
leaves the process: log lines (backupd.logs), error lines on stderr (backupd.cli),
the catalog's error and warning columns (backupd.catalog.models), manifests and
notifications.

The registry is process-wide on purpose: logging is, and a value once seen must stay
hidden for the rest of the process, through config reloads too. Values are only ever added.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

MASK = "***"
# A ${VAR} in a hook command may be a secret or just a path or flag; a value this short is
# no secret, and masking every "1" or "yes" would make the logs unreadable.
HOOK_VALUE_MIN = 4


class Secrets:
    """Values to mask, in every form they take in text backupd writes (plain, JSON, repr)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        if not value:
            return
        forms = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], repr(value)[1:-1]}
        with self._lock:
            if not forms <= self._values:
                self._values |= forms
                self._pattern = None

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                if not self._values:
                    return text
                # Longest first: a secret that contains another is masked whole.
                ordered = sorted(self._values, key=len, reverse=True)
                pattern = self._pattern = re.compile("|".join(map(re.escape, ordered)))
        return pattern.sub(MASK, text)

    def __contains__(self, value: str) -> bool:
        return value in self._values

    def clear(self) -> None:
        """For tests only: a process never forgets a secret."""
        with self._lock:
            self._values.clear()
            self._pattern = None


SECRETS = Secrets()


def remember(value: str | None) -> None:
    """Record a secret value: from now on it is masked wherever backupd writes text."""
    SECRETS.add(value)


def redact(text: str) -> str:
    """text with every recorded secret replaced by ***."""
    return SECRETS.redact(text)


def redact_all(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(v) for v in value]
    return value
