"""Following the engine's container events, so labels are read again when containers change.

One thread reads `docker events` for containers that carry `backupd.enable` (create, start,
stop, die, destroy; backupd's own helpers carry no such label, so its runs stay silent). It
only notes that something changed; the daemon's main thread re-reads the labels once a burst
has been quiet for `debounce` seconds (a `docker compose up` is dozens of events). A broken
or ended stream is reopened, with backoff while the engine is away, and counts as a change:
events may have been missed meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from backupd.labels import ENABLE

log = logging.getLogger(__name__)

FILTERS = {"type": ["container"], "event": ["create", "start", "stop", "die", "destroy"], "label": [ENABLE]}
DEBOUNCE = 2.0
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


class EventWatcher:
    """The event-stream thread; `due()` says when the labels should be read again."""

    def __init__(self, client: Callable[[], Any], wake: Callable[[], None] = lambda: None, *, debounce: float = DEBOUNCE,
                 retry_first: float = RETRY_FIRST, retry_max: float = RETRY_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client  # the engine's docker SDK client, asked for when the thread starts
        self.wake = wake
        self.debounce = debounce
        self.retry_first, self.retry_max = retry_first, retry_max
        self.clock = clock
        self.events = 0  # seen so far, for logs and tests
        self.connections = 0
        self._lock = threading.Lock()
        self._last: float | None = None  # when the newest unhandled change was seen
        self._stopping = threading.Event()
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="backupd-events", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def stop(self, timeout: float = 5.0) -> bool:
        """Close the stream and wait for the thread; True if it ended in time."""
        self._stopping.set()
        self._close_stream()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def changed(self) -> None:
        """Note a change (an event, or a reconnect that may have missed some)."""
        with self._lock:
            self._last = self.clock()
        self.wake()

    def due(self) -> bool:
        """True once per burst, when it has been quiet for `debounce` seconds."""
        with self._lock:
            if self._last is None or self.clock() - self._last < self.debounce:
                return False
            self._last = None
            return True

    def wait_hint(self, default: float) -> float:
        """How long the main loop may sleep before a pending burst is due."""
        with self._lock:
            if self._last is None:
                return default
            return max(0.05, min(default, self._last + self.debounce - self.clock()))

    def _follow(self) -> None:
        delay = self.retry_first
        while not self._stopping.is_set():
            try:
                self._stream = self.client().events(decode=True, filters=FILTERS)
                if self._stopping.is_set():  # stop() came while the stream was opening
                    break
                self.connections += 1
                if self.connections > 1:
                    log.info("Docker event stream reopened; reading container labels again")
                    self.changed()
                delay = self.retry_first
                for event in self._stream:
                    if self._stopping.is_set():
                        break
                    self.events += 1
                    log.debug("container event %s of %s", event.get("Action") or event.get("status"),
                              (event.get("Actor") or {}).get("Attributes", {}).get("name"))
                    self.changed()
                else:
                    if not self._stopping.is_set():
                        log.info("Docker event stream ended; reopening it")
                        if self._stopping.wait(self.retry_first):
                            break
            except Exception as exc:  # noqa: BLE001 - any break of the stream is retried
                if self._stopping.is_set():
                    break
                log.warning("Docker event stream broke (%s: %s); retrying in %.0fs", type(exc).__name__, exc, delay)
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, self.retry_max)
            finally:
                self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail too
                pass
