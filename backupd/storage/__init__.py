"""Destinations: one module per kind behind the Store interface."""

from __future__ import annotations

from typing import Any

from backupd.config import Config
from backupd.storage.base import ObjectInfo, Store, Upload


def open_store(name: str, spec: Any) -> Store:
    """Build the Store for a destination entry of the config."""
    if spec.type == "local":
        from backupd.storage.local import LocalStore

        return LocalStore(name, spec.path)
    if spec.type == "s3":
        from backupd.storage.s3 import S3Store

        return S3Store(name, spec)
    if spec.type == "sftp":
        from backupd.storage.sftp import SftpStore

        return SftpStore(name, spec)
    raise ValueError(f"destination '{name}': type '{spec.type}' is not supported yet")


def configured_stores(config: Config) -> dict[str, Store]:
    """A Store for every destination in the config."""
    return {name: open_store(name, spec) for name, spec in config.destinations.items()}


__all__ = ["ObjectInfo", "Store", "Upload", "configured_stores", "open_store"]
