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

from backupd.app import App
from backupd.config import Config, load_config
from backupd.errors import BackupdError
from backupd.http import HttpEndpoint, parse_bind
from backupd.metrics import Metrics
from backupd.scheduler import CANCEL_WAIT, Sidecar

log = logging.getLogger(__name__)


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


def reload_config(sidecar: Sidecar, path: str, load: Callable[[str], Config] = load_config) -> bool:
    """Swap in the config at `path`; on any error log it and keep the old one."""
    try:
        sidecar.reload(load(path))
        return True
    except BackupdError as exc:
        log.error("config reload refused, keeping the running config: %s", exc)
        return False


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
    sidecar = Sidecar(config, app, app.catalog, clock=app.clock)
    metrics = sidecar.metrics = Metrics(app.catalog, lambda: sidecar.config.jobs)
    endpoint = None
    bind: tuple[str, int] | None = None
    if http_bind:
        bind = parse_bind(http_bind)
    elif config.http.enabled:
        bind = (config.http.host, config.http.port)
    sidecar.start()
    if bind is not None:
        endpoint = HttpEndpoint(bind[0], bind[1], sidecar.health, metrics.render,
                                lambda: sidecar.config.http.token())  # a reload may change the token
    grace = config.scheduler.stop_grace.total_seconds()
    log.info("backupd running: %d scheduled entr%s; SIGHUP reloads %s, SIGTERM stops "
             "(a stop may take up to %.0fs: give the container a longer stop grace period)",
             len(sidecar.entries()), "y" if len(sidecar.entries()) == 1 else "ies", config_path,
             grace + CANCEL_WAIT)
    next_recovery = time.monotonic() + RECOVER_EVERY
    try:
        while not signals.stop:
            signals.wake.wait(timeout=5)
            signals.wake.clear()
            if time.monotonic() >= next_recovery and not signals.stop:
                next_recovery = time.monotonic() + RECOVER_EVERY
                recover_quietly(app)
            if signals.reload and not signals.stop:
                signals.reload = False
                log.info("SIGHUP: reloading %s", config_path)
                reload_config(sidecar, config_path)
        log.info("stop requested: no new runs")
        clean = sidecar.stop()
        log.info("backupd stopped%s", "" if clean else " (running backups were cancelled)")
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0
