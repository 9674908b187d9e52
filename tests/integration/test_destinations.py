"""Off-site destinations end to end: real SeaweedFS (S3) and real OpenSSH (SFTP)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_volumes import (
    archives,
    backupd,
    broken_helper,  # noqa: F401 - fixture
    listing,
    mountpoint,
    snapshot,
    write_config,
)

pytestmark = pytest.mark.integration


def s3_dest(s3_server, bucket: str, **extra) -> dict:
    return {"type": "s3", "bucket": bucket, "prefix": "backups", "endpoint_url": s3_server.endpoint_url,
            "region": "us-east-1", "access_key_id": s3_server.access_key,
            "secret_access_key": s3_server.secret_key, "part_size_mb": 5, **extra}


def sftp_dest(sftp_server, **extra) -> dict:
    return {"type": "sftp", "host": sftp_server.host, "port": sftp_server.port,
            "user": sftp_server.username, "key_file": sftp_server.key_path,
            "known_hosts": sftp_server.known_hosts_path, "path": sftp_server.root_dir, **extra}


def three_way_config(tmp_path, helper_image, s3_server, bucket, sftp_server, vol, only=None, **job):
    dests = {"local": {"type": "local", "path": str(tmp_path / "backups")},
             "s3": s3_dest(s3_server, bucket), "sftp": sftp_dest(sftp_server)}
    if only:
        dests = {only: dests[only]}
    return write_config(tmp_path, helper_image, {"j": {"volumes": [vol], **job}}, destinations=dests)


def s3_objects(s3_server, bucket: str) -> dict[str, int]:
    resp = s3_server.client().list_objects_v2(Bucket=bucket)
    return {o["Key"]: o["Size"] for o in resp.get("Contents", [])}


def test_three_destinations_each_verify_and_each_restores_alone(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("offsite")
    root = mountpoint(docker_client, vol)
    with open(root / "big.bin", "wb") as f:  # 110 MiB incompressible: ~22 parts of 5 MiB
        for _ in range(110):
            f.write(os.urandom(1 << 20))
    (root / "small.txt").write_text("hello")
    before = snapshot(root)
    config = three_way_config(tmp_path, helper_image, s3_server, s3_bucket, sftp_server, vol)

    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [entry] = listing(config)
    assert entry["status"] == "succeeded"
    [art] = entry["artifacts"]
    assert {c["destination"]: c["status"] for c in art["destinations"]} == \
        {"local": "stored", "s3": "stored", "sftp": "stored"}
    key = art["destinations"][0]["key"]
    s3_body = s3_server.client().get_object(Bucket=s3_bucket, Key=f"backups/{key}")["Body"].read()
    assert hashlib.sha256(s3_body).hexdigest() == art["sha256"] and len(s3_body) == art["size"]
    sftp_file = Path(sftp_server.root_dir) / key
    assert hashlib.sha256(sftp_file.read_bytes()).hexdigest() == art["sha256"]
    assert not list(Path(sftp_server.root_dir).rglob(".*partial*"))
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    out = backupd(config, "verify", backup_id, check=True).stdout
    assert out.count("ok   volume") == 3, out

    for only in ("local", "s3", "sftp"):
        (tmp_path / only).mkdir()
        alone = three_way_config(tmp_path / only, helper_image, s3_server, s3_bucket, sftp_server, vol, only=only)
        alone.write_text(alone.read_text().replace(str(tmp_path / only / "catalog.db"), str(tmp_path / "catalog.db"))
                         .replace(str(tmp_path / only / "backups"), str(tmp_path / "backups")))
        target = f"{vol}-from-{only}"
        try:
            backupd(alone, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
            after = snapshot(mountpoint(docker_client, target))
            assert after["entries"] == {k: v for k, v in before["entries"].items()}, only
        finally:
            docker_client.volumes.get(target).remove(force=True)


def test_one_destination_down_makes_a_partial_backup_that_says_which_and_why(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("partial")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={
        "local": {"type": "local", "path": str(tmp_path / "backups")},
        "s3": s3_dest(s3_server, s3_bucket),
        "sftp": sftp_dest(sftp_server, port=1)})  # nothing listens on port 1
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 5
    assert "partial" in proc.stderr and "sftp" in proc.stderr and "cannot connect" in proc.stderr
    [entry] = listing(config)
    assert entry["status"] == "partial"
    copies = {c["destination"]: c for c in entry["artifacts"][0]["destinations"]}
    assert copies["sftp"]["status"] == "failed" and "cannot connect" in copies["sftp"]["error"]
    assert copies["local"]["status"] == copies["s3"]["status"] == "stored"
    assert len(archives(tmp_path)) == 1 and len(s3_objects(s3_server, s3_bucket)) == 2  # archive + manifest


def test_wrong_credentials_fail_clearly_without_leaking_the_secret(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, tmp_path):
    vol = volume_factory("creds")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    secret = "WRONG-" + s3_server.secret_key[6:]
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={
        "s3": s3_dest(s3_server, s3_bucket, secret_access_key=secret)})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert "destination 's3'" in proc.stderr and "SignatureDoesNotMatch" in proc.stderr
    assert secret not in proc.stderr and secret not in proc.stdout
    [entry] = listing(config)
    assert entry["status"] == "failed" and secret not in str(entry)
    assert s3_objects(s3_server, s3_bucket) == {}


@pytest.mark.parametrize("pin", ["known_hosts", "fingerprint"])
def test_unknown_or_changed_sftp_host_key_is_refused(
        docker_client, helper_image, volume_factory, sftp_server, tmp_path, pin):
    vol = volume_factory("hostkey")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = (tmp_path / "other_key.pub").read_text().split()
    if pin == "known_hosts":
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{sftp_server.port} {pub[0]} {pub[1]}\n")
        dest = sftp_dest(sftp_server, known_hosts=str(known))
        expected = "CHANGED"
    else:
        dest = sftp_dest(sftp_server, known_hosts=None, host_key_fingerprint="SHA256:" + "A" * 43)
        expected = "not the pinned"
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={"sftp": dest})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert expected in proc.stderr and "refusing to connect" in proc.stderr
    assert not list(Path(sftp_server.root_dir).rglob(f"j/{listing(config)[0]['id']}*"))


def test_unknown_host_is_refused(docker_client, helper_image, volume_factory, sftp_server, tmp_path):
    vol = volume_factory("nohost")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}},
                          destinations={"sftp": sftp_dest(sftp_server, known_hosts=str(empty))})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1 and "is not in" in proc.stderr and "refusing to connect" in proc.stderr


def test_corrupted_object_is_found_by_verify_and_restore_falls_back(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("corrupt")
    (mountpoint(docker_client, vol) / "a.bin").write_bytes(os.urandom(300_000))
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "destinations": ["s3", "sftp"]}},
                          destinations={"s3": s3_dest(s3_server, s3_bucket), "sftp": sftp_dest(sftp_server)})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    key = listing(config)[0]["artifacts"][0]["destinations"][0]["key"]
    client = s3_server.client()
    body = bytearray(client.get_object(Bucket=s3_bucket, Key=f"backups/{key}")["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=s3_bucket, Key=f"backups/{key}", Body=bytes(body))

    proc = backupd(config, "verify", backup_id)
    assert proc.returncode == 4
    assert "FAIL volume" in proc.stdout and "on s3" in proc.stdout
    assert "ok   volume" in proc.stdout and "on sftp" in proc.stdout
    copies = {c["destination"]: c["status"] for c in listing(config)[0]["artifacts"][0]["destinations"]}
    assert copies == {"s3": "failed", "sftp": "stored"}

    target = f"{vol}-restored"
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        assert (mountpoint(docker_client, target) / "a.bin").read_bytes() == \
            (mountpoint(docker_client, vol) / "a.bin").read_bytes()
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_restore_falls_back_to_the_second_destination_when_the_first_copy_is_missing(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("fallback")
    (mountpoint(docker_client, vol) / "a").write_text("fallback")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "destinations": ["s3", "sftp"]}},
                          destinations={"s3": s3_dest(s3_server, s3_bucket), "sftp": sftp_dest(sftp_server)})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    key = listing(config)[0]["artifacts"][0]["destinations"][0]["key"]
    s3_server.client().delete_object(Bucket=s3_bucket, Key=f"backups/{key}")
    target = f"{vol}-restored"
    try:
        proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target, check=True)
        assert "copy on sftp" in proc.stderr
        assert (mountpoint(docker_client, target) / "a").read_text() == "fallback"
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_encrypted_round_trip_needs_only_public_key_to_back_up(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, tmp_path):
    vol = volume_factory("age")
    (mountpoint(docker_client, vol) / "secret.txt").write_text("top secret payload " * 1000)
    identity = tmp_path / "identity.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                               capture_output=True, text=True).stdout.strip()
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}},
                          destinations={"local": {"type": "local", "path": str(tmp_path / "backups")},
                                        "s3": s3_dest(s3_server, s3_bucket)},
                          encryption={"age_recipients": [recipient]})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    [archive] = archives(tmp_path)
    assert archive.name.endswith(".tar.zst.age")
    assert archive.read_bytes().startswith(b"age-encryption.org/v1")
    assert b"top secret" not in archive.read_bytes()
    art = listing(config)[0]["artifacts"][0]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == art["sha256"]

    out = backupd(config, "verify", backup_id, check=True).stdout
    assert "size and sha256 ok (encrypted" in out
    out = backupd(config, "verify", backup_id, "--identity", str(identity), check=True).stdout
    assert out.count("tar members well-formed") == 2

    target = f"{vol}-plain"
    proc = backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target)
    assert proc.returncode != 0 and "--identity" in proc.stderr
    try:
        backupd(config, "restore", backup_id, "--volume", vol, "--to-volume", target,
                "--identity", str(identity), check=True)
        assert (mountpoint(docker_client, target) / "secret.txt").read_text() == "top secret payload " * 1000
    finally:
        docker_client.volumes.get(target).remove(force=True)


def test_interrupted_s3_upload_is_aborted_and_leaves_no_object_or_parts(
        docker_client, broken_helper, volume_factory, s3_server, s3_bucket, tmp_path):
    vol = volume_factory("abort")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    config = write_config(tmp_path, broken_helper, {"j": {"volumes": [vol]}},
                          destinations={"s3": s3_dest(s3_server, s3_bucket, part_size_mb=5)},
                          compression={"algorithm": "gzip", "level": 1})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert s3_objects(s3_server, s3_bucket) == {}
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_rejected_s3_copy_makes_the_backup_partial_naming_the_copy_and_the_cause(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    # (SeaweedFS creates a missing bucket on first write, so rejected credentials stand in
    # for a permanent S3 error here; moto covers NoSuchBucket in the unit tests.)
    vol = volume_factory("rejected")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    secret = "WRONG-" + s3_server.secret_key[6:]
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={
        "s3": s3_dest(s3_server, s3_bucket, secret_access_key=secret),
        "sftp": sftp_dest(sftp_server)})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 5, proc.stderr
    assert "partial" in proc.stderr and "destination 's3'" in proc.stderr and "the secret key is wrong" in proc.stderr
    [entry] = listing(config)
    copies = {c["destination"]: c for c in entry["artifacts"][0]["destinations"]}
    assert entry["status"] == "partial"
    assert copies["s3"]["status"] == "failed" and "SignatureDoesNotMatch" in copies["s3"]["error"]
    assert copies["sftp"]["status"] == "stored"
    assert (Path(sftp_server.root_dir) / copies["sftp"]["key"]).is_file()
    assert s3_objects(s3_server, s3_bucket) == {}
    assert secret not in proc.stderr + proc.stdout + str(entry)


def test_sftp_login_failure_is_clear_and_does_not_show_the_password(
        docker_client, helper_image, volume_factory, sftp_server, tmp_path):
    vol = volume_factory("sftpauth")
    (mountpoint(docker_client, vol) / "a").write_text("x")
    password = "pw-" + os.urandom(8).hex()
    (tmp_path / "pw").write_text(password)
    dest = sftp_dest(sftp_server, password_file=str(tmp_path / "pw"))
    del dest["key_file"]
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol]}}, destinations={"sftp": dest})
    proc = backupd(config, "backup", "j")
    assert proc.returncode == 1
    assert f"destination 'sftp': authentication as '{sftp_server.username}'" in proc.stderr
    assert password not in proc.stderr + proc.stdout + str(listing(config))


def test_verify_restore_drills_a_restore_from_every_volume_and_leaves_no_scratch_volume(
        docker_client, helper_image, volume_factory, s3_server, s3_bucket, sftp_server, tmp_path):
    vol = volume_factory("drill")
    (mountpoint(docker_client, vol) / "a").write_text("drill")
    config = write_config(tmp_path, helper_image, {"j": {"volumes": [vol], "destinations": ["s3", "sftp"]}},
                          destinations={"s3": s3_dest(s3_server, s3_bucket), "sftp": sftp_dest(sftp_server)})
    backup_id = backupd(config, "backup", "j", check=True).stdout.strip()
    before = {v.name for v in docker_client.volumes.list()}
    out = backupd(config, "verify", backup_id, "--restore", check=True).stdout
    assert out.count(f"ok   volume {vol} on ") == 2
    assert f"ok   volume {vol}: restored into a scratch volume and removed" in out
    assert not [v.name for v in docker_client.volumes.list()
                if v.name.startswith("backupd-drill-") and v.name not in before]
