"""Retry transient failures with exponential backoff and a bound.

Each destination classifies its own errors (a 503 or a reset connection is
transient; bad credentials or a missing bucket are permanent and fail fast).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 5
BASE_DELAY = 0.5
MAX_DELAY = 20.0


def retry(
    action: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    what: str,
    attempts: int = ATTEMPTS,
    base_delay: float = BASE_DELAY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run action; on a transient error wait and try again, at most `attempts` times."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(MAX_DELAY, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s",
                        what, attempt, attempts, delay, exc)
            sleep(delay)
    raise AssertionError("unreachable")
