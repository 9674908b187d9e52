"""What judging the tar stream at backup time costs: backups with and without the guard.

Run as root beside a Docker engine with the helper image (as benchmarks/run). Builds
two volumes, a few large files (--size, default 2 GiB) and many small files
(--small-files, default 100,000), and backs each up through store_artifact with and
without check_tar, alternating, --repeat times. Reports the guard's own CPU time (the
thread it runs in) and throughput, and each backup's wall and process CPU time: on a
shared machine the CPU figures are the ones to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backupd import artifact, docker_host  # noqa: E402
from backupd.artifact import store_artifact  # noqa: E402
from backupd.catalog import Catalog  # noqa: E402
from backupd.config import Compression  # noqa: E402
from backupd.docker_host import DockerHost, VolumeSource  # noqa: E402
from backupd.storage.local import LocalStore  # noqa: E402
from backupd.tarsafety import TarGuard  # noqa: E402

MiB = 1 << 20
HELPER = os.environ.get("BACKUPD_HELPER_IMAGE", "backupd-helper:test")


def few_large(root: Path, total: int) -> None:
    """Four files: half incompressible, half repetitive text."""
    text = b"".join(f"{i} backup volume restore stream catalog\n".encode() for i in range(30_000))[:MiB]
    for n in range(4):
        with open(root / f"large{n}.bin", "wb") as f:
            for _ in range(total // 4 // MiB):
                f.write(os.urandom(MiB) if n % 2 else text)


def many_small(root: Path, count: int) -> None:
    for i in range(count):
        d = root / f"{i % 100:02d}" / f"{(i // 100) % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(f"small file {i}\n".encode() * (i % 64 + 1))


class TimedGuard(TarGuard):
    """The guard, adding the CPU time of its own thread spent in feed() to `spent`."""

    spent = 0.0
    fed = 0

    def feed(self, chunk):
        start = time.thread_time()
        try:
            return super().feed(chunk)
        finally:
            TimedGuard.spent += time.thread_time() - start
            TimedGuard.fed += len(chunk)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backup(host: DockerHost, catalog: Catalog, store: LocalStore, source: VolumeSource, check: bool) -> dict:
    TimedGuard.spent, TimedGuard.fed = 0.0, 0
    backup_id = catalog.start_backup("bench")
    wall, cpu0 = time.monotonic(), cpu()
    status = store_artifact(catalog=catalog, backup_id=backup_id, job="bench", kind="volume", name=source.name,
                            source=f"volume:{source.source}", open_source=lambda: host.tar_stream(source),
                            stores={"local": store}, compression=Compression(), check_tar=check)
    result = {"wall": time.monotonic() - wall, "cpu": cpu() - cpu0, "guard": TimedGuard.spent,
              "bytes": TimedGuard.fed, "status": status}
    catalog.finish_backup(backup_id)
    shutil.rmtree(store.root / "bench", ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048, help="MiB in the volume of large files (default 2048)")
    parser.add_argument("--small-files", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    artifact.TarGuard = TimedGuard  # type: ignore[misc]
    # Another backupd on this engine removes helpers whose owner its own catalog does not
    # know (start-up recovery): a benchmark's helpers wear a label of their own.
    docker_host.HELPER_LABEL = "backupd-benchmark.helper"
    client = docker.from_env(timeout=600)
    host = DockerHost(client, HELPER)
    work = Path(tempfile.mkdtemp(prefix="guard-cost-"))
    catalog = Catalog(f"sqlite:///{work}/catalog.db")
    store = LocalStore("local", work / "archives")
    volumes = []
    try:
        for label, fill in ((f"{args.size} MiB in 4 files", lambda r: few_large(r, args.size * MiB)),
                            (f"{args.small_files} small files", lambda r: many_small(r, args.small_files))):
            name = f"guard-cost-{uuid.uuid4().hex[:8]}"
            client.volumes.create(name)
            volumes.append(name)
            fill(Path(client.volumes.get(name).attrs["Mountpoint"]))
            source = VolumeSource(name, "volume", name, "bench")
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.repeat):
                for check in (False, True):
                    runs[check].append(backup(host, catalog, store, source, check))
            off, on = ({k: median(r[k] for r in runs[c]) for k in ("wall", "cpu", "guard", "bytes")}
                       for c in (False, True))
            print(f"{label}: tar stream {on['bytes'] / MiB:.0f} MiB")
            print(f"  guard alone: {on['guard']:.2f} s CPU ({on['bytes'] / MiB / max(on['guard'], 1e-9):.0f} MiB/s)")
            print(f"  backup without guard: {off['wall']:.2f} s wall, {off['cpu']:.2f} s CPU")
            print(f"  backup with guard:    {on['wall']:.2f} s wall, {on['cpu']:.2f} s CPU "
                  f"({(on['cpu'] / off['cpu'] - 1) * 100:+.1f}% CPU, {(on['wall'] / off['wall'] - 1) * 100:+.1f}% wall)")
    finally:
        for name in volumes:
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(name).remove(force=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
