"""The test services themselves work, so a failure elsewhere points at backupd, not the bench."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

try:
    from .services import (DB_IMAGE, TEST_LABELS, fill_volume, fingerprint_sha256, mountpoint, remove_dead_dbs,
                           run_to_end, unique_name)
except ImportError:
    from services import (DB_IMAGE, TEST_LABELS, fill_volume, fingerprint_sha256, mountpoint, remove_dead_dbs,
                          run_to_end, unique_name)

pytestmark = pytest.mark.integration


def test_helper_image_has_gnu_tar_and_busybox(docker_client, helper_image):
    status, out, err = run_to_end(docker_client, helper_image, ["tar", "--version"])
    assert status == 0 and out.startswith(b"tar (GNU tar)"), (out, err)
    status, out, err = run_to_end(docker_client, helper_image, ["sh", "-c", "find / -maxdepth 0"])
    assert (status, out) == (0, b"/\n"), err


def test_fill_volume_writes_into_the_volume(docker_client, helper_image, volume_factory):
    vol = volume_factory("fill")
    fill_volume(docker_client, helper_image, vol, "mkdir -p /data/d && echo hi > /data/d/f && chown 1234:5678 /data/d/f")
    root = mountpoint(docker_client, vol)
    st = (root / "d" / "f").stat()
    assert (root / "d" / "f").read_text() == "hi\n" and (st.st_uid, st.st_gid) == (1234, 5678)
    # Inside sh, GNU tar must be called by path (busybox sh prefers its own applets).
    listing = fill_volume(docker_client, helper_image, vol, "/bin/tar --numeric-owner -cf - -C /data . | /bin/tar -tvf -")
    assert "1234/5678" in listing
    with pytest.raises(RuntimeError, match="exited 3"):
        fill_volume(docker_client, helper_image, vol, "echo boom; exit 3")


def test_s3_bucket_put_and_get(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/b", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b")["Body"].read() == b"hello"
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]] == ["a/b"]


def test_sftp_put_and_get_with_verified_host_key(sftp_server):
    with sftp_server.connect() as ssh:  # RejectPolicy: only the known_hosts key is accepted
        key = ssh.get_transport().get_remote_server_key()
        assert fingerprint_sha256(key.asbytes()) == sftp_server.host_key_fingerprint
        sftp = ssh.open_sftp()
        with sftp.open(f"{sftp_server.root_dir}/x", "wb") as f:
            f.write(b"data")
        with sftp.open(f"{sftp_server.root_dir}/x", "rb") as f:
            assert f.read() == b"data"
    assert (Path(sftp_server.root_dir) / "x").read_bytes() == b"data"
    line = Path(sftp_server.known_hosts_path).read_text().split()
    assert line[0] == f"[127.0.0.1]:{sftp_server.port}" and line[1] == "ssh-ed25519"
    assert base64.b64decode(line[2]) == key.asbytes()


def test_postgres_answers_in_the_container_and_on_the_bridge(docker_client, postgres_container):
    c = docker_client.containers.get(postgres_container.name)
    res = c.exec_run(["psql", "-U", "postgres", "-tAc", "select 1"])
    assert res.exit_code == 0 and res.output.strip() == b"1", res.output
    env = c.attrs["Config"]["Env"]
    assert f"POSTGRES_PASSWORD={postgres_container.password}" in env
    import psycopg2

    with psycopg2.connect(host=postgres_container.ip, user="postgres", password=postgres_container.password,
                          dbname="postgres", connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute("select 1")
        assert cur.fetchone() == (1,)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host=postgres_container.ip, user="postgres", password="wrong", connect_timeout=10)


def test_mariadb_answers_with_its_password(docker_client, mariadb_container):
    c = docker_client.containers.get(mariadb_container.name)
    assert f"MARIADB_ROOT_PASSWORD={mariadb_container.password}" in c.attrs["Config"]["Env"]
    res = c.exec_run(["mariadb", "-uroot", "-h", mariadb_container.ip, "-N", "-e", "select 1"],
                     environment={"MYSQL_PWD": mariadb_container.password})
    assert res.exit_code == 0 and res.output.strip() == b"1", res.output
    res = c.exec_run(["mariadb", "-uroot", "-h", mariadb_container.ip, "-e", "select 1"],
                     environment={"MYSQL_PWD": "wrong"})
    assert res.exit_code != 0


def test_a_killed_runs_database_container_and_its_volume_are_removed_but_a_running_one_is_kept(
        docker_client, postgres_container) -> None:
    """A test run killed before its session fixtures ended leaves its database containers; the
    next run removes them (only stopped ones: a running one may serve another run)."""
    name = unique_name("backupd-test-pg")
    docker_client.volumes.create(f"{name}-data", labels=TEST_LABELS)
    docker_client.containers.run(DB_IMAGE, ["true"], name=name, labels=TEST_LABELS,
                                 volumes={f"{name}-data": {"bind": "/d", "mode": "rw"}})  # exits at once
    assert remove_dead_dbs(docker_client) >= 1
    names = {c.name for c in docker_client.containers.list(all=True)}
    assert name not in names and postgres_container.name in names
    assert f"{name}-data" not in {v.name for v in docker_client.volumes.list()}
