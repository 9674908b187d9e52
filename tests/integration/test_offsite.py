"""Leftovers of killed uploads on real stores (SeaweedFS, OpenSSH, local directories), and
concurrent S3 parts through a link with latency."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.catalog import Catalog
from backupd.config import parse_config
from backupd.leftovers import sweep_leftovers
from backupd.storage import open_store
from tests.integration.services import LatencyProxy
from tests.integration.test_destinations import s3_dest, sftp_dest
from tests.integration.test_volumes import REPO, backupd, listing, mountpoint, write_config

pytestmark = pytest.mark.integration

ID = "20261122T030000Z-abcdef"


def dead_catalog(tmp_path: Path, destinations: dict) -> tuple[Catalog, dict, str]:
    """A catalog with one backup left running by a backupd that is gone, and the stores."""
    config = parse_config({"catalog": f"sqlite:///{tmp_path / 'catalog.db'}", "destinations": destinations,
                           "jobs": {"j": {"volumes": ["v"]}}}, env={})
    catalog = Catalog(config.catalog)
    backup_id = catalog.start_backup("j", owner="a-backupd-that-was-killed")
    return catalog, {n: open_store(n, spec) for n, spec in config.destinations.items()}, backup_id


def test_an_open_multipart_upload_on_the_real_store_is_listed_with_its_size_and_aborted(
        s3_server, s3_bucket, tmp_path):
    catalog, stores, backup_id = dead_catalog(tmp_path, {"s3": s3_dest(s3_server, s3_bucket)})
    upload = stores["s3"].open_upload(f"j/{backup_id}/volume-v.tar.zst")
    upload.write(os.urandom(11 << 20))  # two 5 MiB parts stored, the rest dies with the process
    upload._wait()  # type: ignore[attr-defined]  # (the parts in flight land first)
    client = s3_server.client()
    [open_upload] = client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]

    dry = sweep_leftovers(catalog, stores, lambda owner: False, dry_run=True)
    [found] = dry.found
    assert found.leftover.key == f"j/{backup_id}/volume-v.tar.zst" and found.leftover.size == 10 << 20
    assert found.keep is None and dry.removed == []
    report = sweep_leftovers(catalog, stores, lambda owner: False)
    assert [f.leftover.upload_id for f in report.removed] == [open_upload["UploadId"]], report.failures
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []


def test_a_partial_file_on_the_sftp_server_is_removed_and_a_live_runs_is_kept(sftp_server, tmp_path):
    root = Path(sftp_server.root_dir) / "leftovers"
    catalog, stores, dead = dead_catalog(tmp_path, {"sftp": sftp_dest(sftp_server, path=str(root))})
    live = catalog.start_backup("j", owner="alive")
    for backup_id in (dead, live):
        upload = stores["sftp"].open_upload(f"j/{backup_id}/volume-v.tar.zst")
        upload.write(b"p" * 100_000)
        upload.handle.flush()  # type: ignore[attr-defined]
    try:
        report = sweep_leftovers(catalog, stores, lambda owner: owner == "alive")
        assert [(f.leftover.key.split("/")[1], f.leftover.size) for f in report.removed] == [(dead, 100_000)]
        assert [p.parent.name for p in root.rglob(".*.partial-*")] == [live]
    finally:
        shutil.rmtree(root)  # the server is shared with other tests, which count partial files


def test_backups_killed_mid_upload_leave_nothing_once_the_next_run_is_done(
        docker_client, helper_image, volume_factory, tmp_path):
    """SIGKILL (no chance to abort) a backup to two local destinations mid-upload, a few times; the
    next good run's start-up recovery removes every partial file, and the named pipes (with their
    private temp directories) the archives came through. (15 random kills: benchmarks/.)"""
    vol = volume_factory("killed")
    with open(mountpoint(docker_client, vol) / "big.bin", "wb") as f:
        for _ in range(120):
            f.write(os.urandom(1 << 20))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={
        "one": {"type": "local", "path": str(tmp_path / "one")},
        "two": {"type": "local", "path": str(tmp_path / "two")}})
    temp = tmp_path / "tmp"  # backupd's temp directory, this test's alone
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)}

    def written_since(before: set[Path]) -> int:
        total = 0
        for path in set(tmp_path.glob("*/j/*/.*.partial-*")) - before:
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # removed by this run's recovery meanwhile
                pass
        return total

    for kill in range(3):
        before = set(tmp_path.glob("*/j/*/.*.partial-*"))  # the last kill's, which this run removes
        proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "j"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while written_since(before) < (2 + 8 * kill) << 20:  # a little later each time
            assert proc.poll() is None and time.monotonic() < deadline, "backup never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(tmp_path.glob("*/j/*/.*.partial-*"))) == 2  # the last kill's, one per destination
    # The last kill's pipe, mid-copy, in its directory: each run removed the one killed before it.
    assert len(list(temp.glob("backupd-fifo-*/*.tar"))) == 1 and len(list(temp.iterdir())) == 1

    proc = backupd(config, "backup", "j", check=True, env={"TMPDIR": str(temp)})
    assert "leftover(s) of interrupted uploads" in proc.stderr and "named pipe(s) of killed runs" in proc.stderr
    assert list(tmp_path.glob("*/j/**/.*.partial-*")) == []
    assert list(temp.iterdir()) == [], "the good run's own pipe directory goes with it"
    statuses = sorted(b["status"] for b in listing(config))
    assert statuses == ["failed", "failed", "failed", "succeeded"]


def test_an_upload_through_a_slow_link_completes_with_several_parts_in_flight(s3_server, s3_bucket):
    """20 ms each way, as on a WAN: the parts overlap instead of waiting for each other."""
    host, port = s3_server.endpoint_url.removeprefix("http://").rsplit(":", 1)
    data = os.urandom(31 << 20)
    with LatencyProxy(host, int(port), delay=0.02) as proxy:
        dest = s3_dest(s3_server, s3_bucket, endpoint_url=f"http://127.0.0.1:{proxy.port}", concurrency=4)
        store = open_store("s3", parse_config({"destinations": {"s3": dest}}, env={}).destinations["s3"])
        upload = store.open_upload(f"j/{ID}/volume-v.tar.zst")
        for start in range(0, len(data), 1 << 20):
            upload.write(data[start:start + (1 << 20)])
        upload.commit()
        assert upload.sent == 7 and upload.peak_in_flight == 4  # 6 parts of 5 MiB and 1 MiB
        assert proxy.connections >= 4  # one connection per part in flight
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=f"backups/j/{ID}/volume-v.tar.zst")["Body"]
    assert hashlib.sha256(body.read()).digest() == hashlib.sha256(data).digest()
