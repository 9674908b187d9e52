"""Fixtures for real services: the Docker engine, the helper image, volumes, SeaweedFS (S3),
OpenSSH (SFTP), PostgreSQL and MariaDB. How they start lives in services.py.

Missing services FAIL the tests rather than skip them: CI must not go green without
integration tests. `bash scripts/testenv.sh all` (as root) installs and builds everything.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

import docker
import pytest
from docker.errors import ImageNotFound, NotFound

try:  # tests/ as a package (with __init__.py files) or as plain rootdir-relative modules
    from .services import (HELPER_IMAGE, SETUP_HINT, TEST_LABELS, DbContainer, S3Server, ServiceError,
                           SftpServer, create_bucket, remove_db, require_image, start_mariadb,
                           start_postgres, start_seaweedfs, start_sshd, stop_process)
except ImportError:
    from services import (HELPER_IMAGE, SETUP_HINT, TEST_LABELS, DbContainer, S3Server, ServiceError,
                          SftpServer, create_bucket, remove_db, require_image, start_mariadb,
                          start_postgres, start_seaweedfs, start_sshd, stop_process)


def _fail(exc: Exception) -> None:
    pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"Docker engine unreachable ({exc}); {SETUP_HINT}", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def helper_image(docker_client: docker.DockerClient) -> str:
    try:
        return require_image(docker_client, HELPER_IMAGE)
    except ServiceError as exc:
        _fail(exc)


def remove_volume(client: docker.DockerClient, name: str) -> None:
    """Remove a volume if it exists; a volume in use cannot be removed, so its users go first."""
    for container in client.containers.list(all=True, filters={"volume": name}):
        container.remove(force=True)
    try:
        client.volumes.get(name).remove(force=True)
    except NotFound:
        pass


@pytest.fixture
def volume_factory(docker_client: docker.DockerClient) -> Iterator[Callable[..., str]]:
    """make(prefix="t") -> name of a new, uniquely named volume; removed (with its users) afterwards."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        docker_client.volumes.create(name, labels=TEST_LABELS)
        made.append(name)
        return name

    yield make
    for name in made:
        remove_volume(docker_client, name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS with an S3 gateway on 127.0.0.1; .endpoint_url, .access_key, .secret_key, .client()."""
    try:
        server, weed = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except ServiceError as exc:
        _fail(exc)
    yield server
    weed.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket's name."""
    return create_bucket(s3_server)


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SftpServer]:
    """OpenSSH sshd on 127.0.0.1 for root with a test key; .root_dir is the remote directory to use."""
    try:
        server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    except ServiceError as exc:
        _fail(exc)
    yield server
    stop_process(proc)


@pytest.fixture(scope="session")
def postgres_container(docker_client: docker.DockerClient) -> Iterator[DbContainer]:
    """PostgreSQL 15 in a container: .name, .password (user postgres), .ip on the bridge."""
    try:
        db = start_postgres(docker_client)
    except ServiceError as exc:
        _fail(exc)
    yield db
    remove_db(docker_client, db)


@pytest.fixture(scope="session")
def mariadb_container(docker_client: docker.DockerClient) -> Iterator[DbContainer]:
    """MariaDB in a container: .name, .password (user root), .ip on the bridge."""
    try:
        db = start_mariadb(docker_client)
    except ServiceError as exc:
        _fail(exc)
    yield db
    remove_db(docker_client, db)


BASE_IMAGE = "backupd-base:test"
REPO = Path(__file__).resolve().parents[2]


IMAGE_SOURCES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")
SIDECAR_IMAGE_LABEL = "backupd.test-image"  # marks the test builds of backupd's image, to find stale ones
SIDECAR_IMAGE_LOCK = Path(tempfile.gettempdir()) / "backupd-test-sidecar-image.lock"


def image_digest(base_id: str) -> str:
    """What backupd's image is built from: the base image and every file of the build context."""
    digest = hashlib.sha256(base_id.encode())
    files = [REPO / name for name in IMAGE_SOURCES]
    files += sorted(p for p in (REPO / "backupd").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(f"\0{path.relative_to(REPO)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def sidecar_image(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """backupd's Dockerfile built on the locally built base, with wheels made on the host.

    Built once for the sources as they are and tagged with their digest: the workers of one
    run (and later runs of the same tree) share it instead of each spending a minute and a
    half of both cores on the same build. Like the other test images it stays on the engine;
    a build for changed sources removes the stale ones.
    """
    try:
        base = docker_client.images.get(BASE_IMAGE)
    except ImageNotFound:
        pytest.fail(f"image {BASE_IMAGE} missing; run `bash scripts/testenv.sh base-image`", pytrace=False)
    tag = f"backupd:test-{image_digest(base.id)}"
    with SIDECAR_IMAGE_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait, then reuse
        try:
            docker_client.images.get(tag)
            return tag
        except ImageNotFound:
            pass
        ctx = tmp_path_factory.mktemp("image")
        for name in IMAGE_SOURCES:
            shutil.copy(REPO / name, ctx / name)
        shutil.copytree(REPO / "backupd", ctx / "backupd", ignore=shutil.ignore_patterns("__pycache__"))
        wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(ctx), "-w", str(ctx / "wheels")],
                               capture_output=True, text=True)
        assert wheel.returncode == 0, wheel.stderr[-2000:]
        build_id = uuid.uuid4().hex[:8]
        try:
            docker_client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True,
                                       labels={SIDECAR_IMAGE_LABEL: "sidecar"}, buildargs={
                                           "BASE_IMAGE": BASE_IMAGE, "PIP_NO_INDEX": "1",
                                           "PIP_FIND_LINKS": "/src/wheels", "BUILD_ID": build_id})
        finally:
            # This build's own build stage only: another run on the engine may be building its own.
            docker_client.images.prune(filters={"dangling": True, "label": f"backupd.build-stage={build_id}"})
        for stale in docker_client.images.list(filters={"label": f"{SIDECAR_IMAGE_LABEL}=sidecar"}):
            if tag not in stale.tags:
                try:  # not forced: an image a container still uses (another run's) stays
                    docker_client.images.remove(stale.id)
                except docker.errors.APIError:
                    pass
    return tag
