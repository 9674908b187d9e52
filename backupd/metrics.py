"""Prometheus metrics: run counters kept in-process, catalog facts read at scrape time.

Counters and the duration histogram count what this process saw; the last
success time and artifacts per destination come from the catalog, so they
survive a restart of the sidecar.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from backupd.catalog import STORED, BackupView, Catalog

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, float("inf"))
DOWNTIME_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


class CatalogCollector(Collector):
    """Gauges read from the catalog at scrape time: a few index lookups, whatever its size."""

    def __init__(self, catalog: Catalog, jobs: Callable[[], Iterable[str]]) -> None:
        self.catalog = catalog
        self.jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        last_ok = GaugeMetricFamily("backupd_last_success_timestamp_seconds",
                                    "When the job's newest successful backup finished", labels=["job"])
        artifacts = GaugeMetricFamily("backupd_artifacts",
                                      "Stored artifact copies per destination (not deleted)",
                                      labels=["destination"])
        try:
            successes = {job: self.catalog.last_runs(job)[1] for job in self.jobs()}
            per_dest = self.catalog.stored_copies()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even with the catalog down
            log.warning("metrics: catalog not readable: %s", type(exc).__name__)
            return
        for job, finished in sorted(successes.items()):
            if finished is not None:
                last_ok.add_metric([job], finished.timestamp())
        for dest, count in sorted(per_dest.items()):
            artifacts.add_metric([dest], count)
        yield last_ok
        yield artifacts


class Metrics:
    """One registry per sidecar (not the global one), so tests and reloads do not collide."""

    def __init__(self, catalog: Catalog, jobs: Callable[[], Iterable[str]]) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter("backupd_runs", "Backup runs by outcome", ["job", "status"],
                            registry=self.registry)
        self.duration = Histogram("backupd_run_duration_seconds", "Wall time of backup runs", ["job"],
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        self.downtime = Histogram("backupd_container_downtime_seconds",
                                  "How long a run held its stop_containers stopped (runs that stop some)",
                                  ["job"], buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.bytes_written = Counter("backupd_bytes_written", "Bytes stored, per destination copy",
                                     ["job", "destination"], registry=self.registry)
        self.registry.register(CatalogCollector(catalog, jobs))

    def observe_run(self, job: str, status: str, seconds: float, backup: BackupView | None) -> None:
        self.runs.labels(job, status).inc()
        self.duration.labels(job).observe(seconds)
        if backup is None:
            return
        if backup.downtime is not None:
            self.downtime.labels(job).observe(backup.downtime)
        for a in backup.artifacts:
            for c in a.copies:
                if c.status == STORED and a.size:
                    self.bytes_written.labels(job, c.destination).inc(a.size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
