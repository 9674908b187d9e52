"""Retention and catalog rebuild against a real engine and real S3 and SFTP stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.test_destinations import s3_dest, s3_objects, sftp_dest
from tests.integration.test_volumes import archives, backupd, listing, mountpoint, write_config

pytestmark = pytest.mark.integration


def test_prune_across_local_s3_and_sftp_keeps_only_the_newest(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("prune")
    root = mountpoint(docker_client, vol)
    sftp_root = Path(sftp_server.root_dir) / vol  # this test's own corner of the shared server
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "retention": {"keep_last": 1}}},
                          destinations={"local": {"type": "local", "path": str(tmp_path / "backups")},
                                        "s3": s3_dest(s3_server, s3_bucket),
                                        "sftp": sftp_dest(sftp_server, path=str(sftp_root))})
    ids = []
    for i in range(3):
        (root / "n").write_text(str(i))
        ids.append(backupd(config, "backup", "j", check=True).stdout.strip())

    dry = backupd(config, "prune", "--dry-run", check=True).stdout
    assert dry.count("  delete  ") == 2 and "nothing deleted" in dry
    assert len(archives(tmp_path)) == 3

    out = backupd(config, "prune", "--job", "j", check=True).stdout
    assert "deleted 2 backup(s)" in out
    assert [b["id"] for b in listing(config)] == [ids[2]]
    assert {p.parent.name for p in archives(tmp_path)} == {ids[2]}
    assert {k.split("/")[2] for k in s3_objects(s3_server, s3_bucket)} == {ids[2]}
    assert {p.parent.name for p in sftp_root.rglob("*.tar.zst")} == {ids[2]}
    again = backupd(config, "prune", check=True).stdout
    assert "deleted 0 backup(s)" in again

    orphans = backupd(config, "prune", "--orphans", check=True).stdout
    assert "no orphans" in orphans


def test_catalog_rebuilt_from_a_destination_then_restored(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, tmp_path):
    vol = volume_factory("rebuild")
    (mountpoint(docker_client, vol) / "precious").write_text("survives the catalog")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}},
                          destinations={"s3": s3_dest(s3_server, s3_bucket)})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    before = listing(config)
    (tmp_path / "catalog.db").unlink()
    for extra in tmp_path.glob("catalog.db-*"):
        extra.unlink()
    assert listing(config) == []
    out = backupd(config, "catalog", "rebuild", "--destination", "s3", check=True).stdout
    assert "imported 1 backup(s)" in out
    after = listing(config)
    assert [(b["id"], b["status"], b["artifacts"][0]["sha256"]) for b in after] == \
        [(b["id"], b["status"], b["artifacts"][0]["sha256"]) for b in before]
    target = f"{vol}-back"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        assert (mountpoint(docker_client, target) / "precious").read_text() == "survives the catalog"
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_a_volume_that_was_emptied_is_a_suspicious_backup_and_retention_waits_for_accept(
        docker_client, helper_image, volume_factory, tmp_path):
    vol = volume_factory("shrink")
    root = mountpoint(docker_client, vol)
    (root / "data.bin").write_bytes(os.urandom(1 << 20))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "retention": {"keep_last": 2}}})
    good = [backupd(config, "backup", "j", check=True).stdout.strip() for _ in range(3)]
    (root / "data.bin").unlink()  # the application wiped its volume
    proc = backupd(config, "backup", "j", check=True)
    small = proc.stdout.strip()
    assert f"backupd: backup {small} warning: suspicious: size" in proc.stderr
    [flagged] = [b for b in listing(config) if b["suspicion"]]
    assert flagged["id"] == small and "below the median" in flagged["suspicion"]

    refused = backupd(config, "prune")
    assert refused.returncode == 3 and f"its newest backup {small} is suspicious" in refused.stderr
    assert len(listing(config)) == 4, "nothing deleted while the newest backup is suspicious"

    backupd(config, "accept", small, check=True)
    backupd(config, "prune", check=True)
    assert {b["id"] for b in listing(config)} == {good[2], small}
