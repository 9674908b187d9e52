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


def s3_destination(server, bucket: str) -> dict:
    return {"type": "s3", "bucket": bucket, "prefix": "host1", "region": "us-east-1",
            "endpoint_url": server.endpoint_url, "access_key_id": server.access_key,
            "secret_access_key": server.secret_key}


def s3_restic(server, bucket: str, password_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESTIC_REPOSITORY": f"s3:{server.endpoint_url}/{bucket}/host1/_restic/j",
           "RESTIC_PASSWORD_FILE": str(password_file), "RESTIC_CACHE_DIR": str(password_file.parent / "host-cache"),
           "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    return subprocess.run(["restic", *args], capture_output=True, text=True, env=env, timeout=300)


def test_three_destinations_read_the_volume_once_keep_the_same_snapshots_and_forget_them_together(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server,  # noqa: F811
        s3_server, s3_bucket):
    vol = volume_factory("repo-three")
    root = mountpoint(docker_client, vol)
    fill(root, 4, big_mb=4, small=60)
    remote = f"{sftp_server.root_dir}/{uuid.uuid4().hex[:8]}"
    # The local destination is listed last: it is still the one the volume is read into.
    destinations = {"s3": s3_destination(s3_server, s3_bucket), "far": sftp_destination(sftp_server, remote),
                    "local": {"type": "local", "path": str(tmp_path / "backups")}}
    config, password = repo_config(tmp_path, helper_image, restic_image,
                                   {"j": {"volumes": [vol], "retention": {"keep_last": 2}}}, destinations)
    runs, trees = [], []
    for i in range(3):
        if i:
            (root / "d" / f"f{i}.txt").write_text(f"changed in run {i}\n")
        runs.append(backupd(config, "backup", "j"))
        trees.append(snapshot(root))
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-800:] for r in runs if r.returncode]
    entries = list(reversed(listing(config)))
    assert [e["status"] for e in entries] == ["succeeded"] * 3
    for entry in entries:
        copies = copies_of(entry)
        assert {d: c["status"] for d, c in copies.items()} == {"s3": "stored", "far": "stored", "local": "stored"}
        # Read once, into the local repository; the others got `restic copy` of that snapshot.
        assert copies["local"]["bytes_added"] is not None
        assert copies["s3"]["bytes_added"] is None and copies["far"]["bytes_added"] is None
        assert len({c["bytes_covered"] for c in copies.values()}) == 1

    pw_file = tmp_path / "password"
    readers = {
        "local": lambda *a: host_restic(tmp_path / "backups" / "_restic" / "j", pw_file, *a),
        "s3": lambda *a: s3_restic(s3_server, s3_bucket, pw_file, *a),
        "far": lambda *a: sftp_restic(sftp_server, f"{remote}/_restic/j", pw_file, *a),
    }

    def listed(dest: str) -> list[dict]:
        out = readers[dest]("snapshots", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    local_ids = {s["short_id"]: s["id"] for s in listed("local")}
    for dest in ("s3", "far"):
        snaps = listed(dest)
        assert [s["short_id"] for s in snaps] == [copies_of(e)[dest]["snapshot_id"] for e in entries]
        # Each is the copy of the local snapshot of the same run, tagged with that run.
        assert [s["original"] for s in snaps] == [local_ids[copies_of(e)["local"]["snapshot_id"]] for e in entries]
        assert [f"backup={e['id']}" in s["tags"] for s, e in zip(snaps, entries)] == [True] * 3

    # Every destination's snapshot of every run restores byte for byte with restic alone.
    for dest in readers:
        for entry, expected in zip(entries, trees):
            target = tmp_path / f"restore-{dest}-{entry['id']}"
            out = readers[dest]("restore", copies_of(entry)[dest]["snapshot_id"], "--target", str(target))
            assert out.returncode == 0, out.stderr
            assert snapshot(target / "data" / vol) == expected, (dest, entry["id"])

    # Retention forgets exactly the oldest run's snapshot in all three repositories.
    pruned = backupd(config, "prune", "--job", "j")
    assert pruned.returncode == 0, pruned.stderr
    kept = entries[1:]
    assert [e["id"] for e in reversed(listing(config))] == [e["id"] for e in kept]
    for dest in readers:
        assert [s["short_id"] for s in listed(dest)] == [copies_of(e)[dest]["snapshot_id"] for e in kept], dest
    gone = json.loads(backupd(config, "show", entries[0]["id"], "--json", check=True).stdout)
    assert {c["status"] for c in gone["artifacts"][0]["destinations"]} == {"deleted"}
    compacted = backupd(config, "prune", "--job", "j", "--compact")
    assert compacted.returncode == 0, compacted.stderr
    assert all(f"{dest}: repository compacted" in compacted.stdout for dest in readers), compacted.stdout
    for dest in readers:
        checked = readers[dest]("check")
        assert checked.returncode == 0 and "no errors were found" in checked.stdout, (dest, checked.stderr)

    # backupd restores each kept run byte for byte too.
    for entry, expected in zip(kept, trees[1:]):
        target = f"{vol}-back-{uuid.uuid4().hex[:6]}"
        try:
            restored = backupd(config, "restore", entry["id"], "--volume", vol, "--to-volume", target)
            runs.append(restored)
            assert restored.returncode == 0, restored.stderr
            assert snapshot(mountpoint(docker_client, target)) == expected
        finally:
            docker_client.volumes.get(target).remove(force=True)

    logs = "".join(r.stdout + r.stderr for r in [*runs, pruned, compacted])
    assert password not in logs and s3_server.secret_key not in logs
    assert docker_client.containers.list(all=True, filters={"label": HELPER_LABEL, "volume": vol}) == []


def test_an_unreachable_sftp_server_makes_the_run_partial_and_the_others_get_their_copies(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server,  # noqa: F811
        s3_server, s3_bucket):
    from tests.integration.services import free_ports

    vol = volume_factory("repo-down")
    (mountpoint(docker_client, vol) / "a.txt").write_text("a\n")
    [closed] = free_ports(1)
    down = {**sftp_destination(sftp_server, sftp_server.root_dir), "port": closed}
    destinations = {"local": {"type": "local", "path": str(tmp_path / "backups")},
                    "down": down, "s3": s3_destination(s3_server, s3_bucket)}
    config, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}}, destinations)
    run = backupd(config, "backup", "j")
    assert run.returncode != 0
    [entry] = listing(config)
    assert entry["status"] == "partial"
    copies = copies_of(entry)
    assert copies["local"]["status"] == copies["s3"]["status"] == "stored"
    assert copies["s3"]["snapshot_id"] and copies["local"]["snapshot_id"]
    assert copies["down"]["status"] == "failed" and "cannot connect" in copies["down"]["error"]


def test_catalog_rebuild_recovers_runs_from_the_repository_snapshots_and_restores_from_them(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server):  # noqa: F811
    vol_a, vol_b = volume_factory("rebuild-a"), volume_factory("rebuild-b")
    (mountpoint(docker_client, vol_a) / "a.txt").write_text("a\n")
    fill(mountpoint(docker_client, vol_b), 5, big_mb=1, small=20)
    expected = snapshot(mountpoint(docker_client, vol_b))
    remote = f"{sftp_server.root_dir}/{uuid.uuid4().hex[:8]}"
    destinations = {"local": {"type": "local", "path": str(tmp_path / "backups")},
                    "far": sftp_destination(sftp_server, remote)}
    config, password = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol_a, vol_b]}},
                                   destinations)
    ids = [backupd(config, "backup", "j", check=True).stdout.strip() for _ in range(2)]
    before = {e["id"]: e for e in listing(config)}
    # A snapshot someone made by hand in the same repository is not taken for a backup.
    stray = sftp_restic(sftp_server, f"{remote}/_restic/j", tmp_path / "password", "backup", "--tag", "mine",
                        str(tmp_path / "password"))
    assert stray.returncode == 0, stray.stderr

    (tmp_path / "catalog.db").unlink()  # the catalog is lost; the repositories are not
    rebuilt = backupd(config, "catalog", "rebuild", "--destination", "far")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "imported 2 backup(s) of job j from its repository on far" in rebuilt.stdout
    assert "was not made by backupd" in rebuilt.stderr
    after = {e["id"]: e for e in listing(config)}
    assert set(after) == set(ids)
    for backup_id in ids:
        got, was = after[backup_id], before[backup_id]
        assert got["job"] == "j" and got["status"] == "succeeded"
        assert got["started_at"][:19] == was["started_at"][:19]
        assert {a["name"]: [(c["destination"], c["snapshot_id"]) for c in a["destinations"]] for a in got["artifacts"]} \
            == {a["name"]: [("far", copies["far"]["snapshot_id"])] for a in was["artifacts"]
                for copies in [{c["destination"]: c for c in a["destinations"]}]}

    # The other destination adds its snapshots to the runs it finds already there.
    again = backupd(config, "catalog", "rebuild", "--destination", "local")
    assert again.returncode == 0 and "2 already in the catalog" in again.stdout, again.stderr
    restored_from = {(c["destination"], c["snapshot_id"]) for a in listing(config)[0]["artifacts"]
                     for c in a["destinations"]}
    assert restored_from == {(c["destination"], c["snapshot_id"]) for a in before[ids[1]]["artifacts"]
                             for c in a["destinations"]}

    target = f"{vol_b}-rebuilt"
    try:
        restored = backupd(config, "restore", ids[1], "--volume", vol_b, "--to-volume", target)
        assert restored.returncode == 0, restored.stderr
        assert snapshot(mountpoint(docker_client, target)) == expected
    finally:
        docker_client.volumes.get(target).remove(force=True)
    assert password not in rebuilt.stdout + rebuilt.stderr + again.stdout + again.stderr


def test_ssh_in_the_helper_trusts_only_the_host_key_backupd_verified(
        docker_client, helper_image, restic_image, volume_factory, tmp_path, sftp_server):  # noqa: F811
    """The second line of defence: were backupd to hand ssh another key than the server's, ssh
    itself refuses to connect (StrictHostKeyChecking), it never learns the server's key."""
    import dataclasses

    from backupd.app import App
    from backupd.config import load_config
    from backupd.repository import Restic, RepositoryError, open_repository

    vol = volume_factory("repo-sftp-strict")
    (mountpoint(docker_client, vol) / "a.txt").write_text("a\n")
    remote = f"{sftp_server.root_dir}/{uuid.uuid4().hex[:8]}"
    config_path, _ = repo_config(tmp_path, helper_image, restic_image, {"j": {"volumes": [vol]}},
                                 {"far": sftp_destination(sftp_server, remote)})
    backupd(config_path, "backup", "j", check=True)  # the repository exists
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    other_b64 = other.with_suffix(".pub").read_text().split()[1]

    config = load_config(config_path)
    app = App(config, "test")
    try:
        restic = Restic(app.host, config)
        repo = open_repository(config, app.host, "j", "far")
        assert len(json.loads(restic.run(repo, ["snapshots", "--json"], "listing"))) == 1
        known = repo.env["BACKUPD_KNOWN_HOSTS"].rsplit(" ", 1)[0]
        forged = dataclasses.replace(repo, env={**repo.env, "BACKUPD_KNOWN_HOSTS": f"{known} {other_b64}"})
        unknown = dataclasses.replace(repo, env={**repo.env, "BACKUPD_KNOWN_HOSTS": f"elsewhere ssh-ed25519 {other_b64}"})
        for wrong in (forged, unknown):  # a changed key, and no key known for the server at all
            with pytest.raises(RepositoryError) as refused:
                restic.run(wrong, ["snapshots", "--json"], "listing")
            assert "Host key verification failed" in str(refused.value)
    finally:
        app.close()
