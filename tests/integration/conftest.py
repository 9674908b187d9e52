"""Fixtures for real services: the Docker engine, helper image, volumes, and (in
services.py) SeaweedFS as S3, OpenSSH as SFTP, PostgreSQL and MariaDB containers.

Integration tests never skip for lack of a service: CI must not pass without
them. `bash scripts/testenv.sh all` installs and starts what they need.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterator

import docker
import pytest
from docker.errors import ImageNotFound, NotFound

from tests.integration.services import (  # noqa: F401 - fixtures re-exported for pytest
    mariadb_container,
    postgres_container,
    s3_bucket,
    s3_server,
    sftp_server,
)

HELPER_IMAGE = "backupd-helper:test"


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        pytest.fail(f"no Docker engine ({exc}); run `bash scripts/testenv.sh all` first", pytrace=False)


@pytest.fixture(scope="session")
def helper_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(HELPER_IMAGE)
    except ImageNotFound:
        pytest.fail(f"image {HELPER_IMAGE} missing; run `bash scripts/testenv.sh helper-image`", pytrace=False)
    return HELPER_IMAGE


@pytest.fixture
def volume_factory(docker_client: docker.DockerClient) -> Iterator[Callable[..., str]]:
    """make(prefix) -> a new, uniquely named volume, removed (with its users) afterwards."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        docker_client.volumes.create(name, labels={"backupd-test": "1"})
        made.append(name)
        return name

    yield make
    for name in made:
        for c in docker_client.containers.list(all=True, filters={"volume": name}):
            c.remove(force=True)
        try:
            docker_client.volumes.get(name).remove(force=True)
        except NotFound:
            pass
