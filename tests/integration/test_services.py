"""The test services themselves work, so other failures point at backupd."""

from __future__ import annotations

import paramiko
import pytest

pytestmark = pytest.mark.integration


def test_helper_image_runs_gnu_tar(docker_client, helper_image):
    out = docker_client.containers.run(helper_image, ["tar", "--version"], remove=True)
    assert b"GNU tar" in out


def test_s3_bucket_put_and_get(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a/b", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b")["Body"].read() == b"hello"


def test_sftp_put_and_get_with_verified_host_key(sftp_server, tmp_path):
    ssh = paramiko.SSHClient()
    ssh.load_host_keys(sftp_server.known_hosts_path)
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    ssh.connect(sftp_server.host, sftp_server.port, username=sftp_server.username,
                key_filename=sftp_server.key_path, look_for_keys=False, allow_agent=False)
    sftp = ssh.open_sftp()
    with sftp.open(f"{sftp_server.root_dir}/x", "wb") as f:
        f.write(b"data")
    assert (tmp_path.parent / "x").exists() or sftp.stat(f"{sftp_server.root_dir}/x").st_size == 4
    ssh.close()


def test_postgres_answers(docker_client, postgres_container):
    c = docker_client.containers.get(postgres_container.name)
    res = c.exec_run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "select 1"],
                     environment={"PGPASSWORD": postgres_container.password})
    assert res.exit_code == 0 and res.output.strip() == b"1"


def test_mariadb_answers(docker_client, mariadb_container):
    c = docker_client.containers.get(mariadb_container.name)
    res = c.exec_run(["mariadb", "-uroot", "-N", "-e", "select 1"],
                     environment={"MYSQL_PWD": mariadb_container.password})
    assert res.exit_code == 0 and res.output.strip() == b"1"
