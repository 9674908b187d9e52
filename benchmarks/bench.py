"""Side-by-side throughput and memory of backupd against what users would do instead.

Run as root beside a Docker engine (see benchmarks/run). Builds a test volume,
then measures on the same data: backupd backup/restore, the tutorial recipe
(docker run ... tar czf / tar xzf), the limit (host tar | zstd -T0 -1, and a
pure tar read), restic and borg. Prints a table and ratios, writes JSON.
Also: backupd's peak memory at 1x and 5x the data, catalog scale, and the
off-site destinations (benchmarks/offsite.py; `--offsite-only` runs them alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import median
from typing import Callable

import docker

REPO = Path(__file__).resolve().parents[1]
HELPER = os.environ.get("BACKUPD_HELPER_IMAGE", "backupd-helper:test")
MiB = 1 << 20
WORDS = ("backup volume restore docker container archive stream catalog retention policy error warning "
         "info debug request response user session token database table index query commit rollback "
         "GET POST 200 404 500 /api/v1/items /healthz latency ms bytes").split()


@dataclass
class Result:
    name: str
    seconds: float
    data_bytes: int
    archive_bytes: int | None = None
    peak_rss_mb: float | None = None
    note: str = ""

    @property
    def mib_s(self) -> float:
        return self.data_bytes / MiB / self.seconds if self.seconds else 0.0


def sh(cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)


def drop_caches() -> None:
    """Every measurement starts with a cold page cache, so none rides on another's reads."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def volume_bytes(root: Path) -> int:
    """The bytes of every file under `root`: what a backup of it reads."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# Peak memory comes from GNU time, which forks the command itself. The ru_maxrss that wait4
# gives for a child forked from this script includes this script's own high-water mark (Linux
# keeps the larger across exec): with the catalog figure loaded it read 128 MB for every command.
GNU_TIME = "/usr/bin/time"


def timed(name: str, cmd: list[str] | str, data_bytes: int, env: dict | None = None,
          archive: Path | None = None, measure_rss: bool = False, note: str = "") -> Result:
    peak_file = None
    if measure_rss:
        if not os.access(GNU_TIME, os.X_OK):
            raise SystemExit(f"{GNU_TIME} (Debian package 'time') is needed to measure peak memory")
        assert isinstance(cmd, list), "peak memory is measured for argument lists"
        fd, path = tempfile.mkstemp(prefix="bench-peak-")
        os.close(fd)
        peak_file = Path(path)
        cmd = [GNU_TIME, "-f", "%M", "-o", str(peak_file), *cmd]
    drop_caches()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    _, status, _usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {err.decode()[-2000:]}")
    size = None
    if archive is not None:
        size = volume_bytes(archive) if archive.is_dir() else archive.stat().st_size
    rss = None
    if peak_file is not None:
        rss = int(peak_file.read_text().split()[-1]) / 1024  # KiB
        peak_file.unlink()
    result = Result(name, seconds, data_bytes, size, rss, note)
    result_out = out.decode().strip()
    print(f"  {name:<34} {seconds:7.1f} s  {result.mib_s:7.1f} MiB/s"
          + (f"  archive {size / MiB:7.1f} MiB" if size else "") + (f"  peak {rss:.0f} MB" if rss else ""),
          flush=True)
    result.note = note or (result_out.splitlines()[-1] if result_out and name.startswith("backupd backup") else note)
    return result


def median_of(repeat: int, measure: Callable[[], Result]) -> Result:
    """The run with the median time: single runs on a small VM vary by a quarter."""
    runs = sorted((measure() for _ in range(repeat)), key=lambda r: r.seconds)
    return runs[len(runs) // 2]


# ------------------------------------------------------------------ data


def text_blocks(count: int, size: int, rng: random.Random) -> list[bytes]:
    blocks = []
    for _ in range(count):
        lines = []
        total = 0
        while total < size:
            line = f"{rng.randrange(10**9)} " + " ".join(rng.choices(WORDS, k=rng.randint(6, 16))) + "\n"
            lines.append(line)
            total += len(line)
        blocks.append("".join(lines).encode()[:size])
    return blocks


def build_volume(client: docker.DockerClient, name: str, total: int, small_files: int) -> tuple[Path, int]:
    """~45% incompressible, ~45% compressible text, and many small files in nested dirs."""
    client.volumes.create(name, labels={"backupd-bench": "1"})
    root = Path(client.volumes.get(name).attrs["Mountpoint"])
    rng = random.Random(42)
    big = int(total * 0.45)
    with open(root / "random.bin", "wb") as f:
        for _ in range(big // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    blocks = text_blocks(64, MiB, rng)
    with open(root / "app.log", "wb") as f:
        for i in range(big // MiB):
            f.write(blocks[(i * 7 + i // 64) % 64])
    per = max(1, int(total * 0.10) // max(small_files, 1))
    for i in range(small_files):
        d = root / "small" / f"{i % 40:02d}" / f"{(i // 40) % 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.txt").write_bytes(blocks[i % 64][: rng.randint(per // 2, per * 3 // 2)])
    return root, volume_bytes(root)


# ------------------------------------------------------------------ measurements


def backupd_cmd(python: str, config: Path, *args: str) -> list[str]:
    return [python, "-m", "backupd", "--log-format", "json", "--log-level", "WARNING", "--config", str(config), *args]


def measure_backupd(client, python: str, work: Path, volume: str, data: int, level: int | None,
                    repeat: int = 1) -> tuple[Result, Result]:
    config = work / "backupd.yml"
    compression = {"algorithm": "zstd"} | ({"level": level} if level else {})
    config.write_text(json.dumps({
        "catalog": f"sqlite:///{work}/catalog.db", "helper_image": HELPER,
        "destinations": {"local": {"type": "local", "path": str(work / "backupd")}},
        "jobs": {"bench": {"volumes": [volume], "compression": compression}}}))
    env = {"PYTHONPATH": str(REPO)}
    backup = timed("backupd backup", backupd_cmd(python, config, "backup", "bench"), data, env,
                   archive=work / "backupd", measure_rss=True)
    backup_id = json.loads(sh(backupd_cmd(python, config, "list", "--json"), env={**os.environ, **env}).stdout)[0]["id"]
    target = f"{volume}-restored-backupd"

    def restore() -> Result:
        result = timed("backupd restore", backupd_cmd(python, config, "restore", backup_id, "--volume", volume,
                                                      "--to-volume", target), data, env, measure_rss=True)
        client.volumes.get(target).remove(force=True)
        return result

    return backup, median_of(repeat, restore)


def measure_recipe(client, work: Path, volume: str, data: int, repeat: int = 1) -> tuple[Result, Result]:
    out = work / "recipe"
    out.mkdir()
    backup = timed("recipe: docker run tar czf", ["docker", "run", "--rm", "-v", f"{volume}:/source:ro", "-v",
                                                  f"{out}:/backup", HELPER, "tar", "czf", "/backup/x.tar.gz",
                                                  "-C", "/source", "."], data, archive=out / "x.tar.gz")
    target = f"{volume}-restored-recipe"

    def restore() -> Result:
        client.volumes.create(target)
        result = timed("recipe: docker run tar xzf", ["docker", "run", "--rm", "-v", f"{target}:/target", "-v",
                                                      f"{out}:/backup", HELPER, "tar", "xzf", "/backup/x.tar.gz",
                                                      "-C", "/target"], data)
        client.volumes.get(target).remove(force=True)
        return result

    return backup, median_of(repeat, restore)


def measure_limit(client, root: Path, work: Path, volume: str, data: int) -> tuple[Result, Result, Result]:
    out = work / "limit.tar.zst"
    zstd = timed("limit: tar | zstd -T0 -1", f"tar -C {root} -cf - . | zstd -q -T0 -1 > {out}", data, archive=out)
    read = timed("limit: tar (pure read)", f"tar -C {root} -cf - . | cat > /dev/null", data)
    target = f"{volume}-restored-limit"
    into = Path(client.volumes.create(target).attrs["Mountpoint"])
    unpack = timed("limit: zstd -dc | tar -x", f"zstd -dc {out} | tar -C {into} --numeric-owner -xf -", data)
    client.volumes.get(target).remove(force=True)
    return zstd, read, unpack


def measure_peers(root: Path, work: Path, data: int) -> list[Result]:
    results = []
    if shutil.which("restic"):
        repo = work / "restic"
        env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(repo), "RESTIC_CACHE_DIR": str(work / "rcache")}
        sh(["restic", "init", "-q"], env={**os.environ, **env})
        results.append(timed("restic backup (first, full)", f"cd {root} && restic backup -q .", data, env,
                             archive=repo))
        dest = work / "restic-restore"
        results.append(timed("restic restore", ["restic", "restore", "latest", "-q", "--target", str(dest)], data, env))
    if shutil.which("borg"):
        repo = work / "borg"
        env = {"BORG_REPO": str(repo), "BORG_PASSPHRASE": "", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
               "BORG_BASE_DIR": str(work / "borgbase")}
        sh(["borg", "init", "-e", "none"], env={**os.environ, **env})
        results.append(timed("borg create (first, full)", f"cd {root} && borg create ::a .", data, env, archive=repo))
        dest = work / "borg-restore"
        dest.mkdir()
        results.append(timed("borg extract", f"cd {dest} && borg extract ::a", data, env))
    return results


RESTIC_IMAGE = os.environ.get("BACKUPD_RESTIC_IMAGE", "backupd-restic:test")


def change_one_percent(root: Path, data: int, run: int) -> None:
    """1% of the data changes: a new incompressible file, and 1% of the small files rewritten."""
    with open(root / f"changed-{run}.bin", "wb") as f:
        f.write(os.urandom(max(data // 100 - data // 1000, 1)))
    small = sorted((root / "small").rglob("*.txt"))
    for path in small[run::100]:
        path.write_bytes(os.urandom(path.stat().st_size or 1))


def run_alone(python: str, config: Path, env: dict, name: str, data: int, stored: int | None) -> Result:
    """The latest backup's own duration as the catalog records it (started to finished): what a
    scheduled run in the daemon costs, whose Python start and imports are paid once, not per run.
    The helper's start is part of it."""
    latest = json.loads(sh(backupd_cmd(python, config, "list", "--json", "--job", "bench"), env=env).stdout)[0]
    started, finished = (datetime.fromisoformat(latest[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
    result = Result(name, (finished - started).total_seconds(), data, stored)
    print(f"  {name:<34} {result.seconds:7.1f} s  (from the catalog)", flush=True)
    return result


def recorded_downtime(python: str, config: Path, env: dict, backup_id: str) -> float:
    """The downtime the run recorded in the catalog (what `show` and /metrics report)."""
    shown = json.loads(sh(backupd_cmd(python, config, "show", backup_id, "--json"), env=env).stdout)
    return float(shown["downtime_seconds"])


def measure_repository(client, python: str, work: Path, volume: str, root: Path, data: int,
                       runs: int, repeat: int = 3) -> tuple[list[Result], list[tuple]]:
    """Repository mode side by side with restic itself on the same volume, step by step:
    first backup, unchanged, `runs` times 1% changed, stored bytes, restore; and the downtime
    of a stop_containers job whose volume is unchanged."""
    app = client.containers.run(HELPER, ["sh", "-c", "trap 'exit 0' TERM; sleep 86400 & wait"], detach=True, labels={"backupd-bench": "1"},
                                volumes={volume: {"bind": "/data", "mode": "ro"}}, name=f"{volume}-app")
    (work / "password").write_text("bench-repository-password\n")  # not a word of the logs: redaction hides it
    config = work / "backupd-repo.yml"
    config.write_text(json.dumps({
        "catalog": f"sqlite:///{work}/catalog-repo.db", "helper_image": HELPER, "repository_image": RESTIC_IMAGE,
        "destinations": {"local": {"type": "local", "path": str(work / "backupd-repo")}},
        "jobs": {"bench": {"volumes": [volume], "format": "repository",
                           "repository_password_file": str(work / "password")},
                 "bench-stop": {"volumes": [volume], "format": "repository", "stop_containers": [app.name],
                                "repository_password_file": str(work / "password")}}}))
    env = {"PYTHONPATH": str(REPO)}
    peer_repo = work / "restic-peer"
    peer_env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(peer_repo),
                "RESTIC_CACHE_DIR": str(work / "restic-peer-cache")}
    sh(["restic", "init", "-q"], env={**os.environ, **peer_env})
    repo_dir = work / "backupd-repo"
    results: list[Result] = []
    pairs: list[tuple[str, Result, Result]] = []
    runs_alone: dict[str, Result] = {}

    def both(label: str) -> None:
        ours = timed(f"backupd repository: {label}", backupd_cmd(python, config, "backup", "bench"), data, env,
                     archive=repo_dir)
        run = run_alone(python, config, {**os.environ, **env}, f"backupd repository: {label}, the run alone",
                        data, ours.archive_bytes)
        theirs = timed(f"restic: {label}", f"cd {root} && restic backup -q --host bench .", data, peer_env,
                       archive=peer_repo)
        results.extend([ours, run, theirs])
        pairs.append((label, ours, theirs))
        runs_alone[label] = run

    try:
        both("first, full")
        both("second, unchanged")
        for run in range(runs):
            change_one_percent(root, data, run)
            both(f"1% changed ({run + 1}/{runs})")
        target = f"{volume}-restored-repo"
        backup_id = json.loads(sh(backupd_cmd(python, config, "list", "--json", "--job", "bench"),
                                  env={**os.environ, **env}).stdout)[0]["id"]
        restores: tuple[list[Result], list[Result]] = ([], [])
        for _ in range(repeat):  # alternating: single restores on this machine vary by a third
            restores[0].append(timed("backupd repository: restore", backupd_cmd(
                python, config, "restore", backup_id, "--volume", volume, "--to-volume", target), data, env))
            client.volumes.get(target).remove(force=True)
            restores[1].append(timed("restic: restore", ["restic", "restore", "latest", "-q", "--target",
                                                         str(work / "restic-peer-restore")], data, peer_env))
            shutil.rmtree(work / "restic-peer-restore", ignore_errors=True)
        ours, theirs = (sorted(runs, key=lambda r: r.seconds)[len(runs) // 2] for runs in restores)
        ours.name, theirs.name = f"{ours.name} (median of {repeat})", f"{theirs.name} (median of {repeat})"
        results.extend([ours, theirs])
        pairs.append(("restore", ours, theirs))
        # Downtime: a stop_containers job on the (now unchanged) volume, after one warm-up run.
        stop_env = {**os.environ, **env}
        cmd = backupd_cmd(python, config, "backup", "bench-stop")
        sh(cmd, env=stop_env)
        downtimes = [recorded_downtime(python, config, stop_env, sh(cmd, env=stop_env).stdout.strip())
                     for _ in range(3)]
        print("  downtime of backupd repository: stop_containers, unchanged: "
              + ", ".join(f"{d:.2f} s" for d in downtimes), flush=True)
        downtime = median(downtimes)
    finally:
        app.remove(force=True)
    first = next(p for p in pairs if p[0] == "first, full")
    unchanged = next(p for p in pairs if p[0] == "second, unchanged")
    changed = [p for p in pairs if p[0].startswith("1% changed")]
    restore = next(p for p in pairs if p[0] == "restore")
    ratios = [
        ("repository: second backup, unchanged, vs restic (x)", unchanged[1].seconds / unchanged[2].seconds, 1.2, False),
        ("repository: backup after 1% changed, vs restic (x, median)",
         median(o.seconds / t.seconds for _, o, t in changed), 1.2, False),
        ("repository: second backup, unchanged, the run alone (as the daemon runs it) vs restic (x)",
         runs_alone[unchanged[0]].seconds / unchanged[2].seconds, 1.2, False),
        ("repository: after 1% changed, the run alone (as the daemon runs it) vs restic (x, median)",
         median(runs_alone[label].seconds / t.seconds for label, _, t in changed), 1.2, False),
        (f"repository: stored bytes after {runs} runs of 1% change, vs restic (x)",
         (changed[-1][1].archive_bytes or 0) / (changed[-1][2].archive_bytes or 1), 1.1, False),
        ("repository: first full backup vs restic (x)", first[1].seconds / first[2].seconds, 1.2, False),
        ("repository: restore throughput vs restic restore (x)", restore[2].seconds / restore[1].seconds, 0.9, True),
        ("repository: downtime, stop_containers, unchanged volume (s)", downtime, 2, False),
    ]
    return results, ratios


def measure_catalog_scale(python: str, work: Path, count: int = 100_000, repeat: int = 5) -> dict:
    """Insert `count` backups fast, then time `list --job` and a retention decision (median of runs)."""
    sys.path.insert(0, str(REPO))
    from sqlalchemy import insert

    from backupd.catalog import Catalog
    from backupd.catalog.models import ArtifactRow, BackupRow, CopyRow

    url = f"sqlite:///{work}/scale.db"
    catalog = Catalog(url)
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    backups, artifacts, copies = [], [], []
    for i in range(count):
        when = start + timedelta(hours=i)
        bid = f"{when:%Y%m%dT%H%M%SZ}-{i:06x}"
        backups.append({"id": bid, "job": "J", "status": "succeeded" if i % 20 else "failed",
                        "started_at": when, "finished_at": when, "total_size": 1000 + i, "artifact_count": 1,
                        "host": "bench", "process": ""})
        artifacts.append({"id": i + 1, "backup_id": bid, "kind": "volume", "name": "v", "source": "volume:v",
                          "compression": "zstd", "status": "succeeded", "size": 1000 + i, "sha256": "0" * 64})
        copies.append({"artifact_id": i + 1, "destination": "local", "key": f"J/{bid}/volume-v.tar.zst",
                       "status": "stored"})
    with catalog.engine.begin() as conn:
        conn.execute(insert(BackupRow), backups)
        conn.execute(insert(ArtifactRow), artifacts)
        conn.execute(insert(CopyRow), copies)
    config = work / "scale.yml"
    config.write_text(json.dumps({"catalog": url, "destinations": {"local": {"type": "local", "path": str(work / "x")}},
                                  "jobs": {"J": {"volumes": ["v"], "retention": {
                                      "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12}}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def seconds(*args: str) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        out = subprocess.run(backupd_cmd(python, config, *args), check=True, capture_output=True, env=env).stdout
        return time.perf_counter() - t0, out

    list_runs = [seconds("list", "--job", "J") for _ in range(repeat)]
    prune_runs = [seconds("prune", "--job", "J", "--dry-run")[0] for _ in range(repeat)]
    list_s, out = median(t for t, _ in list_runs), list_runs[0][1]
    prune_s = median(prune_runs)
    from backupd.retention import BackupRecord, Policy, decide

    records = [BackupRecord(b["id"], b["started_at"].replace(tzinfo=timezone.utc), b["status"]) for b in backups]
    t0 = time.perf_counter()
    decide(records, Policy(keep_daily=7, keep_weekly=4, keep_monthly=12), start + timedelta(hours=count))
    decide_s = time.perf_counter() - t0
    lines = out.count(b"\n") - 1
    health_ms, metrics_ms, full_load_ms = measure_endpoints(catalog, config)
    print(f"  /healthz {health_ms:.1f} ms and /metrics {metrics_ms:.1f} ms per request (median of 21 over HTTP); "
          f"loading every backup as they used to: {full_load_ms:.0f} ms")
    print(f"  catalog with {count} backups, median of {repeat} runs: list --job {list_s:.2f} s ({lines} rows), "
          f"prune --dry-run {prune_s:.2f} s, decide() alone {decide_s:.2f} s")
    print(f"    list runs: {', '.join(f'{t:.2f}' for t, _ in list_runs)}; "
          f"prune runs: {', '.join(f'{t:.2f}' for t in prune_runs)}")
    return {"backups": count, "list_seconds": list_s, "list_rows": lines, "prune_dry_run_seconds": prune_s,
            "healthz_ms": health_ms, "metrics_ms": metrics_ms, "full_load_ms": full_load_ms,
            "decide_seconds": decide_s, "list_runs": [t for t, _ in list_runs], "prune_runs": prune_runs}


def measure_endpoints(catalog, config_path: Path, repeat: int = 21) -> tuple[float, float, float]:
    """Milliseconds per /healthz and /metrics request (median, over real HTTP) on this catalog,
    and what reading every backup with its artifacts (the way they were answered before) takes."""
    import urllib.request

    from backupd.config import load_config
    from backupd.http import HttpEndpoint
    from backupd.metrics import Metrics
    from backupd.scheduler import Sidecar

    config = load_config(config_path)
    config = config.model_copy(update={"jobs": {"J": config.jobs["J"].model_copy(update={"schedule": "0 3 * * *"})}})
    sidecar = Sidecar(config, None, catalog)  # type: ignore[arg-type] - serves health only, runs nothing
    metrics = Metrics(catalog, lambda: config.jobs)
    sidecar.start()
    endpoint = HttpEndpoint("127.0.0.1", 0, sidecar.health, metrics.render)
    try:
        def ms(path: str) -> float:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}{path}", timeout=60) as r:
                    r.read()
                times.append((time.perf_counter() - t0) * 1000)
            return median(times)

        health_ms, metrics_ms = ms("/healthz"), ms("/metrics")
        t0 = time.perf_counter()
        catalog.list()
        full_load_ms = (time.perf_counter() - t0) * 1000
    finally:
        endpoint.close()
        sidecar.stop(grace=0)
    return health_ms, metrics_ms, full_load_ms


def machine() -> dict:
    mem = next(int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    docker_v = sh(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_mib": mem, "kernel": platform.release(),
            "docker": docker_v, "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="2G", help="test volume size, e.g. 200M, 2G (default 2G)")
    parser.add_argument("--small-files", type=int, default=20_000)
    parser.add_argument("--level", type=int, default=None, help="zstd level for backupd (default: backupd's)")
    parser.add_argument("--skip-peers", action="store_true", help="skip restic and borg")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 5x memory and catalog figures")
    parser.add_argument("--catalog-only", action="store_true",
                        help="only the catalog figures (list, prune, /healthz, /metrics at 100k backups)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="restores (backupd's and the recipe's) are run this many times; the median counts")
    parser.add_argument("--repository-only", action="store_true",
                        help="only repository mode (format: repository) side by side with restic itself")
    parser.add_argument("--runs", type=int, default=10, help="repository mode: backups after 1%% changes")
    parser.add_argument("--offsite-only", action="store_true",
                        help="only the off-site figures (S3 against boto3 upload_file, with and without "
                             "latency; SFTP against scp; leftovers after SIGKILLs)")
    parser.add_argument("--skip-offsite", action="store_true", help="skip the off-site figures")
    parser.add_argument("--offsite-size", default="1G", help="test volume size for the off-site figures")
    parser.add_argument("--kills", type=int, default=15, help="SIGKILLs before the good run (off-site figures)")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default benchmarks/results/latest.json, "
                             "or offsite-latest.json with --offsite-only)")
    args = parser.parse_args()
    args.json = args.json or str(REPO / "benchmarks" / "results" /
                                 ("offsite-latest.json" if args.offsite_only else
                                  "repository-latest.json" if args.repository_only else "latest.json"))
    total = parse_size(args.size)
    python = sys.executable
    client = docker.from_env(timeout=600)
    work = Path(tempfile.mkdtemp(prefix="backupd-bench-"))
    volume = f"bench-{uuid.uuid4().hex[:8]}"
    volumes = [volume]
    report: dict = {"machine": machine(), "size": args.size, "started": datetime.now(timezone.utc).isoformat()}
    print(f"machine: {report['machine']}")
    if args.offsite_only:
        try:
            root, data = build_volume(client, volume, parse_size(args.offsite_size), args.small_files)
            print(f"volume {volume}: {data / MiB:.0f} MiB, {args.small_files} small files\n")
            results, ratios, report["offsite"] = measure_offsite(python, work / "offsite", volume, data,
                                                                 args.repeat, args.kills)
            finish(results, ratios, report, args.json)
            return 0
        finally:
            client.volumes.get(volume).remove(force=True)
            shutil.rmtree(work, ignore_errors=True)
    if args.catalog_only:
        try:
            cat = measure_catalog_scale(python, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for name, value, target in (("/healthz ms", cat["healthz_ms"], 50), ("/metrics ms", cat["metrics_ms"], 50),
                                    ("list --job s", cat["list_seconds"], 1),
                                    ("prune --dry-run s", cat["prune_dry_run_seconds"], 2)):
            print(f"  catalog of 100k: {name:<20} {value:8.2f}  target <= {target}: "
                  + ("met" if value <= target else "MISSED"))
        return 0
    try:
        root, data = build_volume(client, volume, total, args.small_files)
        print(f"volume {volume}: {data / MiB:.0f} MiB, {args.small_files} small files\n")
        results = []
        if args.repository_only:
            results, ratios = measure_repository(client, python, work, volume, root, data, args.runs,
                                                 args.repeat)
            print("\n" + table(results) + "\n")
            for name, value, target, higher in ratios:
                verdict = f"target {'>=' if higher else '<='} {target}: " + (
                    "met" if (value >= target if higher else value <= target) else "MISSED")
                print(f"  {name:<62} {value:7.2f}  {verdict}")
            report["results"] = [asdict(r) | {"mib_s": r.mib_s} for r in results]
            report["ratios"] = [{"figure": n, "value": v, "target": t, "higher_is_better": h}
                                for n, v, t, h in ratios]
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
            print(f"\nresults written to {args.json}")
            return 0
        b_backup, b_restore = measure_backupd(client, python, work, volume, data, args.level, args.repeat)
        r_backup, r_restore = measure_recipe(client, work, volume, data, args.repeat)
        l_zstd, l_read, l_unpack = measure_limit(client, root, work, volume, data)
        results += [b_backup, b_restore, r_backup, r_restore, l_zstd, l_read, l_unpack]
        if not args.skip_peers:
            results += measure_peers(root, work, data)
        offsite: list[tuple] = []
        if not args.skip_offsite:
            print("\noff-site destinations...")
            off_results, offsite, report["offsite"] = measure_offsite(python, work / "offsite", volume, data,
                                                                      args.repeat, args.kills)
            results += off_results
        # (figure, value, target, True if higher is better)
        ratios = [
            ("backup speed vs recipe", r_backup.seconds / b_backup.seconds, 3, True),
            ("backup throughput vs limit tar|zstd -T0 -1", l_zstd.seconds / b_backup.seconds, 0.70, True),
            ("restore speed vs recipe", r_restore.seconds / b_restore.seconds, 3, True),
            ("restore throughput vs limit zstd -dc|tar -x (no target)", l_unpack.seconds / b_restore.seconds,
             None, True),
            ("backup peak memory MB", b_backup.peak_rss_mb or 0, 150, False),
            ("restore peak memory MB", b_restore.peak_rss_mb or 0, 150, False),
        ]
        if not args.skip_scale:
            big_volume = f"{volume}-5x"
            volumes.append(big_volume)
            print(f"\n5x volume for the memory figure ({5 * data / MiB:.0f} MiB)...")
            _, big_data = build_volume(client, big_volume, 5 * total, args.small_files)
            work5 = work / "x5"
            work5.mkdir()
            big_backup, _ = measure_backupd(client, python, work5, big_volume, big_data, args.level)
            results.append(Result("backupd backup (5x data)", big_backup.seconds, big_data,
                                  big_backup.archive_bytes, big_backup.peak_rss_mb))
            ratios.append(("peak memory growth at 5x data, MB",
                           (big_backup.peak_rss_mb or 0) - (b_backup.peak_rss_mb or 0), 20, False))
            report["catalog"] = measure_catalog_scale(python, work)
        if "catalog" in report:
            cat = report["catalog"]
            ratios += [("catalog of 100k: list --job seconds", cat["list_seconds"], 1, False),
                       ("catalog of 100k: prune --dry-run seconds", cat["prune_dry_run_seconds"], 2, False),
                       ("catalog of 100k: /healthz ms per request", cat["healthz_ms"], 50, False),
                       ("catalog of 100k: /metrics ms per request", cat["metrics_ms"], 50, False)]
        finish(results, ratios + offsite, report, args.json)
        return 0
    finally:
        for name in volumes:
            try:
                client.volumes.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        shutil.rmtree(work, ignore_errors=True)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


def measure_offsite(python: str, work: Path, volume: str, data: int, repeat: int, kills: int):
    from offsite import measure_offsite as measure

    return measure(python, work, volume, data, repeat, kills)


def finish(results: list[Result], ratios: list[tuple], report: dict, path: str) -> None:
    """Print the table and each figure against its target; write everything as JSON."""
    print("\n" + table(results))
    print()
    for name, value, target, higher in ratios:
        verdict = "" if target is None else (
            f"target {'>=' if higher else '<='} {target}: "
            + ("met" if (value >= target if higher else value <= target) else "MISSED"))
        print(f"  {name:<66} {value:7.2f}  {verdict}")
    report["results"] = [asdict(r) | {"mib_s": r.mib_s} for r in results]
    report["ratios"] = [{"figure": n, "value": v, "target": t, "higher_is_better": h} for n, v, t, h in ratios]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"\nresults written to {path}")


def table(results: list[Result]) -> str:
    rows = [("what", "wall s", "MiB/s", "archive MiB", "peak MB")]
    for r in results:
        rows.append((r.name, f"{r.seconds:.1f}", f"{r.mib_s:.0f}",
                     f"{r.archive_bytes / MiB:.0f}" if r.archive_bytes else "-",
                     f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


if __name__ == "__main__":
    raise SystemExit(main())
