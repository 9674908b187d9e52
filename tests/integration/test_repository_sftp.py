"""Repository mode on SFTP, and on several destinations at once: restic in helper containers
against the real OpenSSH server, SeaweedFS and a local directory, driven through the CLI.

The host's restic (with the host's ssh) reads the repositories afterwards, as a user would if
backupd were gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from backupd.docker_host import HELPER_LABEL
from tests.integration.test_repository import fill, host_restic, repo_config, restic_image  # noqa: F401
from tests.integration.test_volumes import backupd, listing, mountpoint, snapshot

pytestmark = pytest.mark.integration


def sftp_destination(server, path: str, **extra) -> dict:
    return {"type": "sftp", "host": server.host, "port": server.port, "user": server.username,
            "key_file": server.key_path, "known_hosts": server.known_hosts_path, "path": path, **extra}


def sftp_restic(server, path: str, password_file: Path, *args: str) -> subprocess.CompletedProcess:
    """The host's restic on an SFTP repository, through the host's ssh with the test's known_hosts."""
    ssh = (f"ssh -i {server.key_path} -o UserKnownHostsFile={server.known_hosts_path} "
           f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {server.port} -l {server.username} "
           f"{server.host} -s sftp")
    env = {**os.environ, "RESTIC_REPOSITORY": f"sftp:{server.username}@{server.host}:{path}",
           "RESTIC_PASSWORD_FILE": str(password_file), "RESTIC_CACHE_DIR": str(password_file.parent / "host-cache")}
    return subprocess.run(["restic", "-o", f"sftp.command={ssh}", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def copies_of(entry: dict) -> dict[str, dict]:
    [artifact] = entry["artifacts"]
    return {c["destination"]: c for c in artifact["destinations"]}


def test_an_sftp_repository_backs_up_deduplicates_and_restores_byte_for_byte(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server):  # noqa: F811
    vol = volume_factory("repo-sftp")
    root = mountpoint(docker_client, vol)
    fill(root, 3, big_mb=4, small=80)
    expected = snapshot(root)
    remote = f"{sftp_server.root_dir}/{uuid.uuid4().hex[:8]}"
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}},
                                   {"far": sftp_destination(sftp_server, remote)})
    runs = [backupd(config, "backup", "j"), backupd(config, "backup", "j")]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-800:] for r in runs if r.returncode]
    first, second = [copies_of(e)["far"] for e in reversed(listing(config))]
    assert first["status"] == second["status"] == "stored" and first["key"] == "_restic/j"
    assert first["bytes_added"] > 4 << 20 and second["bytes_added"] < 64 << 10

    # Plain restic over the host's ssh sees both snapshots where the README says they are.
    listed = sftp_restic(sftp_server, f"{remote}/_restic/j", tmp_path / "password", "snapshots", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [s["short_id"] for s in json.loads(listed.stdout)] == [first["snapshot_id"], second["snapshot_id"]]

    target = f"{vol}-from-sftp"
    try:
        restored = backupd(config, "restore", listing(config)[1]["id"], "--volume", vol, "--to-volume", target)
        assert restored.returncode == 0, restored.stderr
        assert snapshot(mountpoint(docker_client, target)) == expected
    finally:
        docker_client.volumes.get(target).remove(force=True)
    verified = backupd(config, "verify", listing(config)[0]["id"])
    assert verified.returncode == 0 and "restic check passed" in verified.stdout, verified.stdout + verified.stderr

    # Neither the repository password nor the private key shows in any output or the catalog.
    private_key = Path(sftp_server.key_path).read_text().strip()
    key_body = private_key.splitlines()[1]
    logs = "".join(r.stdout + r.stderr for r in [*runs, restored, verified])
    assert password not in logs and key_body not in logs
    catalog = (tmp_path / "catalog.db").read_bytes()
    assert password.encode() not in catalog and key_body.encode() not in catalog
    assert docker_client.containers.list(all=True, filters={"label": HELPER_LABEL, "volume": vol}) == []


def test_a_pinned_host_key_fingerprint_works_and_another_servers_key_is_refused(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server):  # noqa: F811
    vol = volume_factory("repo-sftp-pin")
    (mountpoint(docker_client, vol) / "a.txt").write_text("a\n")
    remote = f"{sftp_server.root_dir}/{uuid.uuid4().hex[:8]}"
    pinned = sftp_destination(sftp_server, remote, host_key_fingerprint=sftp_server.host_key_fingerprint)
    del pinned["known_hosts"]
    wrong = {**pinned, "host_key_fingerprint": "SHA256:" + "A" * 43}
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}},
                            {"pinned": pinned, "impostor": wrong})
    run = backupd(config, "backup", "j")
    assert run.returncode != 0
    [entry] = listing(config)
    assert entry["status"] == "partial"
    copies = copies_of(entry)
    assert copies["pinned"]["status"] == "stored" and copies["pinned"]["snapshot_id"]
    assert copies["impostor"]["status"] == "failed" and copies["impostor"]["snapshot_id"] is None
    assert "not the pinned" in copies["impostor"]["error"]
