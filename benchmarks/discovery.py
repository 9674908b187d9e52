"""What reading container labels costs, and how soon the daemon's event thread notices a change.

Run beside a Docker engine with the helper image built (scripts/testenv.sh helper-image):

    .venv/bin/python benchmarks/discovery.py [--containers 20 50 200]

For each count it creates that many labelled containers (created, not started: labels and
mounts are what discovery reads) and times `read_containers` + `discover` (median of 5), and,
with the event thread running, the time from `docker create` of one more labelled container
until the change is noted (before the debounce). Everything it makes carries one label of
its own and is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backupd.config import parse_config  # noqa: E402
from backupd.discovery import discover, read_containers  # noqa: E402
from backupd.events import EventWatcher  # noqa: E402

HELPER_IMAGE = "backupd-helper:test"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, nargs="+", default=[20, 50, 200])
    parser.add_argument("--image", default=HELPER_IMAGE)
    args = parser.parse_args()
    client = docker.from_env(timeout=300)
    run = uuid.uuid4().hex[:8]
    mark = {"backupd-bench-discovery": run}
    config = parse_config({"discovery": {"enabled": True, "schedule": "0 3 * * *"}})
    results = []
    try:
        made = 0
        for count in sorted(args.containers):
            while made < count:
                client.containers.create(args.image, ["true"], name=f"bench-{run}-{made}",
                                         labels={**mark, "backupd.enable": "true", "backupd.job": f"bench-{run}",
                                                 "backupd.stop": "true"},
                                         volumes={f"bench-{run}-{made}": {"bind": "/data", "mode": "rw"}})
                made += 1
            times = []
            for _ in range(5):
                started = time.perf_counter()
                found = discover(config, read_containers(client))
                times.append(time.perf_counter() - started)
            job = found.config.jobs.get(f"bench-{run}")
            assert job is not None and len(job.volumes) >= count, "every container discovered"
            results.append({"labelled_containers": count, "read_and_discover_s": round(statistics.median(times), 3)})
        watcher = EventWatcher(lambda: client, debounce=0)
        watcher.start()
        deadline = time.monotonic() + 10
        while watcher.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        latencies = []
        for i in range(5):
            seen = watcher.events
            started = time.perf_counter()
            client.containers.create(args.image, ["true"], name=f"bench-{run}-ev{i}",
                                     labels={**mark, "backupd.enable": "true"})
            while watcher.events == seen and time.perf_counter() - started < 10:
                time.sleep(0.001)
            latencies.append(time.perf_counter() - started)
        watcher.stop()
        results.append({"create_to_event_noted_s_median": round(statistics.median(latencies), 4)})
    finally:
        for c in client.containers.list(all=True, filters={"label": f"backupd-bench-discovery={run}"}):
            c.remove(force=True, v=True)
        for v in client.volumes.list(filters={"name": f"bench-{run}-"}):
            v.remove(force=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
