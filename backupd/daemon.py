"""`backupd run`: the long-running sidecar process and its signals.

SIGTERM/SIGINT: stop taking runs, give running ones `scheduler.stop_grace`,
then cancel them (they get CANCEL_WAIT more to unwind); exit 0. SIGHUP:
reload the config file; a new config that does not validate is refused
(logged) and the old one kept. Signal handlers only set flags; the main
thread does the work.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable

from backupd import notify
from backupd.app import App
from backupd.config import Config, load_config
from backupd.discovery import Discovered, discover, log_changes, new_breakages
from backupd.errors import BackupdError, LabelError
from backupd.events import EventWatcher
from backupd.http import HttpEndpoint, parse_bind
from backupd.metrics import Metrics
from backupd.scheduler import CANCEL_WAIT, Sidecar

log = logging.getLogger(__name__)

RUNS_LEFT = 1  # exit code: a cancelled run did not unwind in time (the next start recovers it)


class Signals:
    """Flags set by signal handlers, read by the main loop."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop = False
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop = True
        self.wake.set()

    def _on_reload(self, signum: int, frame: Any) -> None:
        self.reload = True
        self.wake.set()


Breakages = list[tuple[str, LabelError]]  # (discovered job, what keeps it from running)


def notify_wait(config: Config) -> float:
    """How long a stop waits for label notifications in flight: a ping and a webhook."""
    return 2 * config.notifications.timeout.total_seconds() + 1


def notify_broken(config: Config, broken: Breakages) -> threading.Thread | None:
    """Send each breakage through the notifications, from a thread of its own: a receiver that
    does not answer must not hold the main loop (signals, container events) for its timeout.
    Returns the sending thread, which the daemon waits for before it exits."""
    if not broken or not (config.notifications.ping_url or notify.webhook_url(config.notifications)):
        return None

    def send() -> None:
        for job, error in broken:
            notify.label_broken(config.notifications, job, error)

    thread = threading.Thread(target=send, name="label-notify", daemon=True)
    thread.start()
    return thread


class Jobs:
    """The daemon's jobs: the config file's, plus those container labels declare, kept current.

    `written` is the config as loaded (SIGHUP replaces it); `discover` adds the labelled jobs
    (App.discover). When the engine cannot be read, the jobs discovered last stay. A label that
    breaks a job is reported through `on_broken` when it first appears, not at every refresh."""

    def __init__(self, written: Config, discover: Callable[[Config], Discovered],
                 on_broken: Callable[[Config, Breakages], threading.Thread | None] = notify_broken) -> None:
        self.written = written
        self._discover = discover
        self._on_broken = on_broken
        self._sending: list[threading.Thread] = []
        self.last: Discovered | None = None

    def current(self) -> Config:
        if not self.written.discovery.enabled:
            self.last = None
            return self.written
        try:
            found = self._discover(self.written)
        except BackupdError as exc:
            log.warning("container labels not read, keeping the jobs discovered before: %s", exc)
            if self.last is None:
                return self.written
            return discover(self.written, self.last.containers).config
        log_changes(self.last, found)
        sending = self._on_broken(self.written, new_breakages(self.last, found))
        self._sending = [t for t in self._sending if t.is_alive()] + ([sending] if sending else [])
        self.last = found
        return found.config

    def finish_notifying(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for label notifications still being sent (a breakage found
        just before SIGTERM is still reported); False if some were not done in time."""
        deadline = time.monotonic() + timeout
        for thread in self._sending:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._sending)


def reload_config(sidecar: Sidecar, path: str, load: Callable[[str], Config] = load_config,
                  jobs: Jobs | None = None) -> bool:
    """Swap in the config at `path`; on any error log it and keep the old one."""
    try:
        written = load(path)
        if jobs is not None:
            jobs.written = written
            sidecar.reload(jobs.current())
        else:
            sidecar.reload(written)
        return True
    except BackupdError as exc:
        log.error("config reload refused, keeping the running config: %s", exc)
        return False


def refresh_labels(sidecar: Sidecar, jobs: Jobs) -> None:
    """Containers changed: read the labels again; reschedule only if the jobs changed."""
    try:
        config = jobs.current()
        if config.jobs != sidecar.config.jobs:
            sidecar.reload(config, why="container labels changed")
    except BackupdError as exc:
        log.error("discovered jobs not updated: %s", exc)
    except Exception as exc:  # noqa: BLE001 - the main loop must outlive any surprise from the engine
        log.exception("discovered jobs not updated: %s: %s", type(exc).__name__, exc)


def with_discovery(health: tuple[bool, dict[str, Any]], jobs: Jobs) -> tuple[bool, dict[str, Any]]:
    """/healthz also lists the label errors that keep discovered jobs from running (they do not
    make it 503: every job that exists still runs)."""
    healthy, report = health
    if jobs.written.discovery.enabled:
        report["discovery"] = {"label_errors": [str(e) for e in jobs.last.errors()] if jobs.last else []}
    return healthy, report


RECOVER_EVERY = 60.0  # seconds: a CLI command killed while the daemon runs is undone this soon


def recover_quietly(app: App) -> None:
    """Recovery again, for what a CLI command killed while the daemon runs left behind."""
    try:
        app.recover(quiet=True)
    except Exception as exc:  # noqa: BLE001 - the engine or catalog may be back next minute
        log.warning("recovery failed: %s: %s", type(exc).__name__, exc)


def run_daemon(config_path: str, app: App, http_bind: str | None, signals: Signals | None = None) -> int:
    """Serve schedules until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
    signals = signals or Signals()
    if threading.current_thread() is threading.main_thread():
        signals.install()
    config = app.config
    app.host  # connect the engine and run start-up recovery before the first run
    jobs = Jobs(config, lambda written: app.discover(written))
    sidecar = Sidecar(jobs.current(), app, app.catalog, clock=app.clock)
    watcher = EventWatcher(lambda: app.host.client, signals.wake.set)
    metrics = sidecar.metrics = Metrics(app.catalog, lambda: sidecar.config.jobs)
    endpoint = None
    bind: tuple[str, int] | None = None
    if http_bind:
        bind = parse_bind(http_bind)
    elif config.http.enabled:
        bind = (config.http.host, config.http.port)
    sidecar.start()
    if config.discovery.enabled:
        watcher.start()
    if bind is not None:
        endpoint = HttpEndpoint(bind[0], bind[1], lambda: with_discovery(sidecar.health(), jobs), metrics.render,
                                lambda: sidecar.config.http.token())  # a reload may change the token
    grace = config.scheduler.stop_grace.total_seconds()
    log.info("backupd running: %d scheduled entr%s; SIGHUP reloads %s, SIGTERM stops "
             "(a stop may take up to %.0fs: give the container a longer stop grace period)",
             len(sidecar.entries()), "y" if len(sidecar.entries()) == 1 else "ies", config_path,
             grace + CANCEL_WAIT + notify_wait(config))
    next_recovery = time.monotonic() + RECOVER_EVERY
    try:
        while not signals.stop:
            signals.wake.wait(timeout=watcher.wait_hint(5))
            signals.wake.clear()
            if watcher.due() and not signals.stop and jobs.written.discovery.enabled:
                refresh_labels(sidecar, jobs)
            if time.monotonic() >= next_recovery and not signals.stop:
                next_recovery = time.monotonic() + RECOVER_EVERY
                recover_quietly(app)
            if signals.reload and not signals.stop:
                signals.reload = False
                log.info("SIGHUP: reloading %s", config_path)
                reload_config(sidecar, config_path, jobs=jobs)
                if jobs.written.discovery.enabled and not watcher.started:
                    watcher.start()
        log.info("stop requested: no new runs")
        if not watcher.stop():
            log.warning("the Docker event stream did not close in time")
        clean = sidecar.stop()
        if not jobs.finish_notifying(notify_wait(jobs.written)):
            log.warning("a label-error notification was still being sent at exit and may be lost")
        log.info("backupd stopped%s", "" if clean else " (running backups were cancelled)")
    finally:
        watcher.stop()
        if endpoint is not None:
            endpoint.close()
    if sidecar.running():  # logged by the stop: "runs still going ... exiting anyway"
        return RUNS_LEFT
    return 0
