"""Off-site destinations side by side with what users would run instead, on the same archive.

Starts its own SeaweedFS (S3) and OpenSSH (SFTP) on 127.0.0.1 (tests/integration/services.py),
then, on one test volume:

- backupd backup to S3 against boto3's `upload_file` (what the AWS CLI uses) of the archive
  backupd made, directly and through a proxy adding 20 ms each way (a WAN's round trip);
- backupd backup to SFTP against `scp` of the same archive;
- the transport alone: backupd's S3 and SFTP stores uploading that finished archive, against
  the same references (a backup also reads and compresses the volume, which the references
  do not: with a fast store, that is what a backup's time is made of; see the local figure);
- backupd's peak memory (GNU time) with its default S3 concurrency and part size;
- leftovers: SIGKILLs at random moments of backups to two local directories and S3, then
  one good run; counts the `.partial-` files and open multipart uploads left.

Runs alternate (backupd, reference, backupd, ...) so the machine's drift hits both; the
median of `repeat` runs counts, and every run is printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Callable

from bench import HELPER, REPO, MiB, Result, backupd_cmd, timed

sys.path.insert(0, str(REPO))
from tests.integration.services import (LatencyProxy, create_bucket, start_seaweedfs,  # noqa: E402
                                        start_sshd, stop_process)

LATENCY = 0.02  # seconds each way


def store_upload_cmd(python: str, config: Path, destination: str, archive: Path, key: str) -> list[str]:
    """backupd's own Store upload of a finished file (its transport alone: no volume, no compression)."""
    code = ("import sys; from backupd.config import load_config; from backupd.storage import open_store\n"
            "config, name, path, key = sys.argv[1:]\n"
            "store = open_store(name, load_config(config).destinations[name])\n"
            "upload = store.open_upload(key)\n"
            "with open(path, 'rb') as f:\n"
            "    while chunk := f.read(1 << 20):\n"
            "        upload.write(chunk)\n"
            "upload.commit()\n"
            "store.close()\n")
    return [python, "-c", code, str(config), destination, str(archive), key]


def upload_file_cmd(python: str, endpoint: str, bucket: str, archive: Path, key: str) -> list[str]:
    code = ("import sys, boto3; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1')"
            ".upload_file(sys.argv[2], sys.argv[3], sys.argv[4])")
    return [python, "-c", code, endpoint, str(archive), bucket, key]


def median_result(runs: list[Result]) -> Result:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def measure_offsite(python: str, work: Path, volume: str, data: int, repeat: int = 3,
                    kills: int = 15) -> tuple[list[Result], list[tuple], dict]:
    """The offsite figures: (results for the table, (figure, value, target, higher is better), details)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "sshd").mkdir()
    s3, weed = start_seaweedfs(work / "weed")
    sftp, sshd = start_sshd(work / "sshd")
    host, port = s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = LatencyProxy(host, int(port), delay=LATENCY)
    try:
        return _measure(python, work, volume, data, repeat, kills, s3, sftp, proxy)
    finally:
        proxy.close()
        stop_process(sshd)
        weed.stop()


def _measure(python, work, volume, data, repeat, kills, s3, sftp, proxy):
    bucket = create_bucket(s3)
    slow_endpoint = f"http://127.0.0.1:{proxy.port}"
    s3_common = {"type": "s3", "bucket": bucket, "region": "us-east-1", "access_key_id": s3.access_key,
                 "secret_access_key": s3.secret_key}
    destinations = {
        "archive": {"type": "local", "path": str(work / "archive")},
        "s3": {**s3_common, "endpoint_url": s3.endpoint_url, "prefix": "backupd"},
        "s3_slow": {**s3_common, "endpoint_url": slow_endpoint, "prefix": "backupd-slow"},
        "sftp": {"type": "sftp", "host": sftp.host, "port": sftp.port, "user": sftp.username,
                 "key_file": sftp.key_path, "known_hosts": sftp.known_hosts_path, "path": sftp.root_dir},
    }
    config = work / "offsite.yml"
    config.write_text(json.dumps({
        "catalog": f"sqlite:///{work}/catalog.db", "helper_image": HELPER, "destinations": destinations,
        "jobs": {name: {"volumes": [volume], "destinations": [name]} for name in destinations}}))
    env = {"PYTHONPATH": str(REPO)}
    aws = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    local = timed("backupd backup to local (no upload)", backupd_cmd(python, config, "backup", "archive"), data, env,
                  measure_rss=True)
    [archive] = [p for p in (work / "archive").rglob("*.tar.*")]
    size = archive.stat().st_size
    local.archive_bytes = size
    print(f"  archive: {size / MiB:.0f} MiB", flush=True)
    scp = ["scp", "-q", "-i", sftp.key_path, "-o", f"UserKnownHostsFile={sftp.known_hosts_path}",
           "-o", "StrictHostKeyChecking=yes", "-P", str(sftp.port)]
    pairs: dict[str, tuple[Callable[[int], Result], Callable[[int], Result]]] = {
        "s3": (lambda i: timed("backupd backup to S3", backupd_cmd(python, config, "backup", "s3"), data, env,
                               measure_rss=True),
               lambda i: timed("boto3 upload_file of the archive",
                               upload_file_cmd(python, s3.endpoint_url, bucket, archive, f"ref/{i}"), data, aws)),
        "s3_slow": (lambda i: timed("backupd backup to S3, +20 ms", backupd_cmd(python, config, "backup", "s3_slow"),
                                    data, env, measure_rss=True),
                    lambda i: timed("boto3 upload_file, +20 ms",
                                    upload_file_cmd(python, slow_endpoint, bucket, archive, f"ref-slow/{i}"),
                                    data, aws)),
        "sftp": (lambda i: timed("backupd backup to SFTP", backupd_cmd(python, config, "backup", "sftp"), data, env,
                                 measure_rss=True),
                 lambda i: timed("scp of the archive", [*scp, str(archive), f"root@127.0.0.1:{sftp.root_dir}/scp-{i}"],
                                 data)),
    }
    # The transport alone: backupd's Store uploading the finished archive, against the same references.
    pairs.update({
        "s3 store": (lambda i: timed("backupd S3 store, the archive", store_upload_cmd(
                         python, config, "s3", archive, f"store/{i}"), data, env, measure_rss=True),
                     pairs["s3"][1]),
        "s3_slow store": (lambda i: timed("backupd S3 store, the archive, +20 ms", store_upload_cmd(
                              python, config, "s3_slow", archive, f"store/{i}"), data, env, measure_rss=True),
                          pairs["s3_slow"][1]),
        "sftp store": (lambda i: timed("backupd SFTP store, the archive", store_upload_cmd(
                           python, config, "sftp", archive, f"store-{i}"), data, env, measure_rss=True),
                       pairs["sftp"][1]),
    })
    runs: dict[str, tuple[list[Result], list[Result]]] = {name: ([], []) for name in pairs}
    for i in range(repeat):
        for name, (ours, theirs) in pairs.items():
            runs[name][0].append(ours(i))
            runs[name][1].append(theirs(i))
    results, ratios, details = [local], [], {"archive_bytes": size, "runs": {}}
    targets = {"s3": 1.1, "s3_slow": 1.1, "sftp": 1.3, "s3 store": 1.1, "s3_slow store": 1.1, "sftp store": 1.3}
    labels = {"s3": "backupd backup to S3 / boto3 upload_file",
              "s3_slow": "backupd backup to S3 / upload_file, +20 ms each way",
              "sftp": "backupd backup to SFTP / scp",
              "s3 store": "transport alone: S3 store / upload_file",
              "s3_slow store": "transport alone: S3 store / upload_file, +20 ms",
              "sftp store": "transport alone: SFTP store / scp"}
    for name, (ours, theirs) in runs.items():
        a, b = median_result(ours), median_result(theirs)
        a.archive_bytes = b.archive_bytes = size
        results += [a] if name.endswith(" store") else [a, b]
        ratios.append((f"{labels[name]} (median of {repeat})", a.seconds / b.seconds, targets[name], False))
        details["runs"][name] = {"backupd": [r.seconds for r in ours], "reference": [r.seconds for r in theirs],
                                 "backupd_peak_mb": [r.peak_rss_mb for r in ours]}
        print(f"    {name}: backupd {', '.join(f'{r.seconds:.1f}' for r in ours)} s; reference "
              f"{', '.join(f'{r.seconds:.1f}' for r in theirs)} s", flush=True)
    peak = max(r.peak_rss_mb or 0 for name in ("s3", "s3_slow", "sftp") for r in runs[name][0])
    ratios.append(("backupd backup peak memory to S3 and SFTP (default concurrency), MB", peak, 150, False))
    ratios.append(("  the same backup to local (no upload), MB", local.peak_rss_mb or 0, None, False))
    left, open_uploads, killed_at = measure_kills(python, work, config, volume, destinations["s3"], kills,
                                                  median(r.seconds for r in runs["s3"][0]))
    ratios.append((f"partial files + open uploads after {kills} SIGKILLs and one good run", left + open_uploads,
                   0, False))
    details.update({"kills": kills, "killed_at_seconds": killed_at, "partials_left": left,
                    "open_uploads_left": open_uploads})
    return results, ratios, details


def measure_kills(python: str, work: Path, config: Path, volume: str, s3_dest: dict, kills: int,
                  duration: float) -> tuple[int, int, list[float]]:
    """SIGKILL backups to two local directories and S3 at random moments, then one good run.
    Returns (partial files left, multipart uploads left open, the kill times)."""
    import boto3

    base = json.loads(config.read_text())
    s3 = {**s3_dest, "prefix": "killed"}
    base["destinations"] = {"one": {"type": "local", "path": str(work / "kill-one")},
                            "two": {"type": "local", "path": str(work / "kill-two")}, "s3": s3}
    base["jobs"] = {"kill": {"volumes": [volume]}}
    config = work / "kills.yml"
    config.write_text(json.dumps(base))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(16)
    killed_at = []
    for n in range(kills):
        proc = subprocess.Popen(backupd_cmd(python, config, "backup", "kill"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        moment = rng.uniform(0.2, duration)
        try:
            proc.wait(timeout=moment)
            print(f"  kill {n + 1}: the backup ended before {moment:.1f} s", flush=True)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at.append(round(moment, 2))
        partials = list(work.glob("kill-*/**/.*.partial-*"))
        print(f"  kill {n + 1} at {moment:.1f} s: {len(partials)} partial file(s), "
              f"{sum(p.stat().st_size for p in partials) / MiB:.0f} MiB on disk", flush=True)
    good = subprocess.run(backupd_cmd(python, config, "backup", "kill"), env=env, capture_output=True, text=True)
    if good.returncode != 0:
        raise SystemExit(f"the good run after the kills failed:\n{good.stderr[-2000:]}")
    partials = list(work.glob("kill-*/**/.*.partial-*"))
    client = boto3.client("s3", endpoint_url=s3["endpoint_url"], region_name="us-east-1",
                          aws_access_key_id=s3["access_key_id"], aws_secret_access_key=s3["secret_access_key"])
    uploads = client.list_multipart_uploads(Bucket=s3["bucket"], Prefix="killed/").get("Uploads", [])
    print(f"  after {kills} kills and one good run: {len(partials)} partial file(s), {len(uploads)} open "
          f"multipart upload(s)", flush=True)
    return len(partials), len(uploads), killed_at
