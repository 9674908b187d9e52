"""`backupd run`: the long-running sidecar process and its signals.

SIGTERM/SIGINT: stop taking runs, give running ones `scheduler.stop_grace`,
then cancel them cleanly; exit 0. SIGHUP: reload the config file; a new
config that does not validate is refused (logged) and the old one kept.
Signal handlers only set flags; the main thread does the work.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from backupd.catalog import Catalog
from backupd.config import Config, load_config
from backupd.errors import BackupdError
from backupd.http import HttpEndpoint, parse_bind
from backupd.metrics import Metrics
from backupd.scheduler import Sidecar, docker_host_for

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


def prepare_engine(config: Config, catalog: Catalog) -> None:
    """Before the first run: fail what a killed backupd left running, remove its stopped helpers."""
    for backup_id in catalog.fail_interrupted():
        log.warning("backup %s was left running by a stopped backupd: recorded failed", backup_id,
                    extra={"backup_id": backup_id})
    host = docker_host_for(config)
    removed = host.remove_stale_helpers()
    if removed:
        log.info("removed %d stale helper container(s)", removed)


def run_daemon(config_path: str, config: Config, catalog: Catalog, http_bind: str | None,
               signals: Signals | None = None) -> int:
    """Serve schedules until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
    signals = signals or Signals()
    if threading.current_thread() is threading.main_thread():
        signals.install()
    prepare_engine(config, catalog)
    metrics = Metrics(catalog)
    sidecar = Sidecar(config, catalog, metrics=metrics)
    endpoint = None
    if http_bind:
        host, port = parse_bind(http_bind)
    elif config.http.enabled:
        host, port = config.http.host, config.http.port
    else:
        host = port = None  # type: ignore[assignment]
    sidecar.start()
    if host is not None:
        endpoint = HttpEndpoint(host, port, sidecar.health, metrics.render)
    log.info("backupd running: %d scheduled entr%s; SIGHUP reloads %s, SIGTERM stops",
             len(sidecar.entries()), "y" if len(sidecar.entries()) == 1 else "ies", config_path)
    try:
        while not signals.stop:
            signals.wake.wait(timeout=5)
            signals.wake.clear()
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
