"""Repository mode (format: repository) end to end: restic in helper containers on a real engine.

The repository image is backupd's test base (Debian) with this machine's restic copied in,
as backupd's own image carries Debian's restic. The tests read the repository afterwards
with the host's restic, as a user would if backupd were gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from docker.errors import ImageNotFound

from backupd.docker_host import HELPER_LABEL
from tests.integration.test_volumes import REPO, backupd, listing, mountpoint, snapshot

pytestmark = pytest.mark.integration

RESTIC_IMAGE = "backupd-restic:test"
BASE_IMAGE = "backupd-base:test"


RESTIC_RECIPE = "ssh-v1"  # bump when the image's recipe changes: an older image is rebuilt


@pytest.fixture(scope="session")
def restic_image(docker_client, tmp_path_factory) -> str:
    """backupd-base:test with the host's restic (Debian's package, as in backupd's image) and
    Debian's OpenSSH client (restic's sftp backend runs ssh), as backupd's image has them."""
    restic = shutil.which("restic")
    if restic is None:
        pytest.fail("restic is not installed; run `bash scripts/testenv.sh install`", pytrace=False)
    try:
        image = docker_client.images.get(RESTIC_IMAGE)
        if (image.labels.get("restic") == Path(restic).stat().st_mtime_ns.__str__()
                and image.labels.get("recipe") == RESTIC_RECIPE):
            return RESTIC_IMAGE
    except ImageNotFound:
        pass
    try:
        docker_client.images.get(BASE_IMAGE)
    except ImageNotFound:
        pytest.fail(f"image {BASE_IMAGE} missing; run `bash scripts/testenv.sh base-image`", pytrace=False)
    ctx = tmp_path_factory.mktemp("restic-image")
    shutil.copy(restic, ctx / "restic")
    (ctx / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\n"
        "RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends openssh-client >/dev/null && rm -rf /var/lib/apt/lists/* && ssh -V\n"
        "COPY restic /usr/bin/restic\n"
        f"LABEL restic={Path(restic).stat().st_mtime_ns} recipe={RESTIC_RECIPE}\n")
    docker_client.images.build(path=str(ctx), tag=RESTIC_IMAGE, rm=True, forcerm=True)
    return RESTIC_IMAGE


def repo_config(tmp_path: Path, helper_image: str, restic_image: str, jobs: dict,
                destinations: dict | None = None) -> tuple[Path, str]:
    """A config whose jobs use format: repository; returns (config path, the password)."""
    password = f"pw-{uuid.uuid4().hex}"
    (tmp_path / "password").write_text(password + "\n")
    config = {
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "helper_image": helper_image,
        "repository_image": restic_image,
        "destinations": destinations or {"local": {"type": "local", "path": str(tmp_path / "backups")}},
        "jobs": {name: {"format": "repository", "repository_password_file": str(tmp_path / "password"), **job}
                 for name, job in jobs.items()},
    }
    path = tmp_path / "backupd.yml"
    path.write_text(json.dumps(config))
    return path, password


def host_restic(repository: Path, password_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESTIC_REPOSITORY": str(repository), "RESTIC_PASSWORD_FILE": str(password_file),
           "RESTIC_CACHE_DIR": str(password_file.parent / "host-cache")}
    return subprocess.run(["restic", *args], capture_output=True, text=True, env=env, timeout=300)


def fill(root: Path, seed: int, big_mb: int = 8, small: int = 300) -> None:
    rnd = __import__("random").Random(seed)
    (root / "big.bin").write_bytes(rnd.randbytes(big_mb << 20))
    (root / "d").mkdir(exist_ok=True)
    for i in range(small):
        (root / "d" / f"f{i}.txt").write_text(f"line {i}\n" * (i % 50 + 1))
    os.link(root / "d" / "f1.txt", root / "d" / "hard.txt")
    os.symlink("../big.bin", root / "d" / "link")
    os.chown(root / "d" / "f2.txt", 1234, 5678)
    os.chmod(root / "d" / "f3.txt", 0o640)


def snapshot_of(listing_entry: dict) -> dict:
    [artifact] = listing_entry["artifacts"]
    [copy] = artifact["destinations"]
    return copy


def test_unchanged_backup_adds_almost_nothing_and_every_snapshot_restores_byte_for_byte(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    vol = volume_factory("repo")
    root = mountpoint(docker_client, vol)
    fill(root, 1)
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}})
    runs = [backupd(config, "backup", "j")]
    first = snapshot(root)
    runs.append(backupd(config, "backup", "j"))
    (root / "d" / "f7.txt").write_text("changed\n")
    runs.append(backupd(config, "backup", "j"))
    third = snapshot(root)
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-600:] for r in runs if r.returncode]
    entries = list(reversed(listing(config)))
    assert [e["status"] for e in entries] == ["succeeded"] * 3
    copies = [snapshot_of(e) for e in entries]
    assert all(c["status"] == "stored" and c["key"] == "_restic/j" and c["snapshot_id"] for c in copies)
    assert copies[0]["bytes_added"] > 8 << 20
    assert copies[1]["bytes_added"] < 64 << 10, "an unchanged volume must add (almost) nothing"
    assert all(c["bytes_covered"] >= 8 << 20 for c in copies)

    # The host's restic sees the same snapshots, at the stable path, tagged with the run.
    repository, pw_file = tmp_path / "backups" / "_restic" / "j", tmp_path / "password"
    listed = json.loads(host_restic(repository, pw_file, "snapshots", "--json").stdout)
    assert [s["short_id"] for s in listed] == [c["snapshot_id"] for c in copies]
    assert all(s["paths"] == [f"/data/{vol}"] and s["hostname"] == "backupd" for s in listed)
    assert f"backup={entries[0]['id']}" in listed[0]["tags"]

    for entry, expected in ((entries[0], first), (entries[2], third)):
        target = f"{vol}-restored-{uuid.uuid4().hex[:6]}"
        try:
            restored = backupd(config, "restore", entry["id"], "--volume", vol, "--to-volume", target)
            assert restored.returncode == 0, restored.stderr
            got = snapshot(mountpoint(docker_client, target))
            assert got == expected
        finally:
            docker_client.volumes.get(target).remove(force=True)

    # verify: restic check of the repository, the snapshot looked up, and a restore drill.
    verified = backupd(config, "verify", entries[2]["id"], "--restore")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "restic check passed" in verified.stdout and "restored into a scratch volume" in verified.stdout

    # The original is not empty: refused without --force, replaced with it.
    refused = backupd(config, "restore", entries[0]["id"], "--volume", vol)
    assert refused.returncode != 0 and "not empty" in refused.stderr
    assert snapshot(root) == third
    forced = backupd(config, "restore", entries[0]["id"], "--volume", vol, "--force")
    assert forced.returncode == 0, forced.stderr
    assert snapshot(root)["entries"] == first["entries"]

    # The password is in no log line and no catalog row.
    logs = "".join(r.stdout + r.stderr for r in [*runs, verified, refused, forced])
    assert password not in logs
    assert password.encode() not in (tmp_path / "catalog.db").read_bytes()
    assert password not in backupd(config, "show", entries[0]["id"], "--json").stdout


def test_a_failed_restore_into_a_new_volume_removes_it(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    vol = volume_factory("repo-undo")
    (mountpoint(docker_client, vol) / "a.txt").write_text("one\n")
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    (tmp_path / "password").write_text("not the password\n")
    target = f"{vol}-never"
    failed = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target)
    assert failed.returncode != 0 and "wrong password" in failed.stderr
    assert target not in [v.name for v in docker_client.volumes.list()]


def test_retention_forgets_exactly_the_doomed_snapshots(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    vol_a, vol_b = volume_factory("keep-a"), volume_factory("keep-b")
    (mountpoint(docker_client, vol_a) / "a.txt").write_text("a\n")
    (mountpoint(docker_client, vol_b) / "b.txt").write_text("b\n")
    config, _ = repo_config(tmp_path, helper_image, restic_image,
                            {"j": {"volumes": [vol_a, vol_b], "retention": {"keep_last": 1}}})
    ids = [backupd(config, "backup", "j", check=True).stdout.strip() for _ in range(2)]
    before = {e["id"]: e for e in listing(config)}
    doomed = {c["snapshot_id"] for a in before[ids[0]]["artifacts"] for c in a["destinations"]}
    kept = {c["snapshot_id"] for i in ids[1:] for a in before[i]["artifacts"] for c in a["destinations"]}
    assert len(doomed) == 2 and len(kept) == 2

    pruned = backupd(config, "prune", "--job", "j")
    assert pruned.returncode == 0, pruned.stderr
    listed = host_restic(tmp_path / "backups" / "_restic" / "j", tmp_path / "password", "snapshots", "--json")
    assert {s["short_id"] for s in json.loads(listed.stdout)} == kept
    assert {e["id"] for e in listing(config)} == set(ids[1:])
    gone = json.loads(backupd(config, "show", ids[0], "--json", check=True).stdout)
    assert gone["deleted_at"] is not None
    assert {c["status"] for a in gone["artifacts"] for c in a["destinations"]} == {"deleted"}

    # Compaction frees the forgotten data under the job's lease; the kept snapshots stay whole.
    compacted = backupd(config, "prune", "--job", "j", "--compact")
    assert compacted.returncode == 0 and "local: repository compacted" in compacted.stdout, compacted.stderr
    check = host_restic(tmp_path / "backups" / "_restic" / "j", tmp_path / "password", "check", "--read-data")
    assert check.returncode == 0, check.stdout + check.stderr
    listed = host_restic(tmp_path / "backups" / "_restic" / "j", tmp_path / "password", "snapshots", "--json")
    assert {s["short_id"] for s in json.loads(listed.stdout)} == kept


def test_sigkill_mid_backup_leaves_a_repository_restic_check_passes(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    vol = volume_factory("repo-kill")
    root = mountpoint(docker_client, vol)
    for i in range(6):
        (root / f"big{i}.bin").write_bytes(os.urandom(32 << 20))
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}})
    backupd(config, "backup", "j", check=True)  # the repository exists; the kill hits a second run
    for i in range(6):
        (root / f"new{i}.bin").write_bytes(os.urandom(32 << 20))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "backupd", "--config", str(config), "backup", "j"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    packs = tmp_path / "backups" / "_restic" / "j" / "data"
    before = sum(1 for _ in packs.rglob("*"))
    deadline = time.monotonic() + 60
    while sum(1 for _ in packs.rglob("*")) < before + 3:  # restic is writing new packs
        assert proc.poll() is None and time.monotonic() < deadline, "the backup never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    # The next backupd finds the run dead, removes its helper and its lock, and backs up.
    again = backupd(config, "backup", "j")
    assert again.returncode == 0, again.stderr
    entries = listing(config)
    assert [e["status"] for e in entries] == ["succeeded", "failed", "succeeded"]
    assert docker_client.containers.list(all=True, filters={"label": HELPER_LABEL, "volume": vol}) == []
    check = host_restic(tmp_path / "backups" / "_restic" / "j", tmp_path / "password", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "no errors were found" in check.stdout


def test_an_unreachable_repository_makes_the_run_partial(
        docker_client, helper_image, restic_image, volume_factory, tmp_path):
    vol = volume_factory("repo-partial")
    (mountpoint(docker_client, vol) / "a.txt").write_text("a\n")
    destinations = {
        "local": {"type": "local", "path": str(tmp_path / "backups")},
        "gone": {"type": "s3", "bucket": "nowhere", "endpoint_url": "http://127.0.0.1:9",
                 "access_key_id": "K", "secret_access_key": "S"},
    }
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}}, destinations)
    run = backupd(config, "backup", "j")
    assert run.returncode != 0
    [entry] = listing(config)
    assert entry["status"] == "partial"
    copies = {c["destination"]: c for c in entry["artifacts"][0]["destinations"]}
    assert copies["local"]["status"] == "stored" and copies["local"]["snapshot_id"]
    assert copies["gone"]["status"] == "failed" and copies["gone"]["snapshot_id"] is None


def test_an_s3_repository_on_a_real_store_backs_up_and_restores_byte_for_byte(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, s3_server, s3_bucket):
    vol = volume_factory("repo-s3")
    root = mountpoint(docker_client, vol)
    fill(root, 2, big_mb=4, small=50)
    expected = snapshot(root)
    destinations = {"s3": {"type": "s3", "bucket": s3_bucket, "prefix": "host1", "region": "us-east-1",
                           "endpoint_url": s3_server.endpoint_url, "access_key_id": s3_server.access_key,
                           "secret_access_key": s3_server.secret_key}}
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}}, destinations)
    runs = [backupd(config, "backup", "j"), backupd(config, "backup", "j")]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-600:] for r in runs if r.returncode]
    first, second = [snapshot_of(e) for e in reversed(listing(config))]
    assert first["status"] == second["status"] == "stored"
    assert second["bytes_added"] < 64 << 10
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "host1/_restic/j/config" in keys
    target = f"{vol}-from-s3"
    try:
        restored = backupd(config, "restore", listing(config)[0]["id"], "--volume", vol, "--to-volume", target)
        assert restored.returncode == 0, restored.stderr
        assert snapshot(mountpoint(docker_client, target)) == expected
    finally:
        docker_client.volumes.get(target).remove(force=True)
    logs = "".join(r.stdout + r.stderr for r in [*runs, restored])
    assert password not in logs and s3_server.secret_key not in logs
