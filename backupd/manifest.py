"""The manifest beside a backup's archives: its catalog record, for `catalog rebuild`.

A run writes one into `<job>/<backup id>/` on each destination that holds a copy
(run.write_manifests); `catalog rebuild` reads them back (prune.rebuild_catalog).
Besides what `show --json` prints, each artifact carries its block digests,
`"blocks": {"size": 4194304, "sha256": "<base64 of the 32-byte SHA-256 of each
block, concatenated>"}`, so a rebuilt catalog restores with one read.

A manifest is as untrusted as the archives beside it: whoever can write to a
destination can forge one. So reading one checks every field's type and
shape, and binds it to where it was read from: its job and id must be those
of its own directory. Which of its copies it may vouch for is the reader's
decision (see prune.rebuild_catalog).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backupd.catalog import BackupView
from backupd.storage.base import MANIFEST

FORMAT = 1
# A manifest is held whole: 64 MiB holds the block digests of about 6 TiB of archives.
MAX_MANIFEST = 64 << 20
DIGEST = 32  # bytes of one SHA-256


class BadManifest(ValueError):
    """A manifest that says nothing the catalog may use: malformed, or not where it claims to be."""


def manifest_key(job: str, backup_id: str) -> str:
    return f"{job}/{backup_id}/{MANIFEST}"


def manifest_of(backup: BackupView, blocks: Mapping[int, tuple[int, bytes]] | None = None) -> dict[str, Any]:
    """What a destination needs to rebuild this backup's catalog rows: its JSON form, and
    each artifact's (block size, block digests) from `blocks` (by artifact id) when known."""
    data = backup.to_json()
    data["format"] = FORMAT
    for art, view in zip(data["artifacts"], backup.artifacts):
        known = (blocks or {}).get(view.id)
        if known is not None:
            art["blocks"] = {"size": known[0], "sha256": base64.b64encode(known[1]).decode("ascii")}
    return data


# ------------------------------------------------------------------ reading


class _Entry(BaseModel):
    # Strict: "1" is not 1, and a list is not a string. Keys a later backupd adds are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class CopyEntry(_Entry):
    destination: str = Field(min_length=1)
    key: str = Field(min_length=1)
    status: Literal["pending", "stored", "failed", "deleted", "missing"]
    error: str | None = None


class BlocksEntry(_Entry):
    size: int = Field(gt=0, le=1 << 30)
    sha256: str

    def digests(self) -> bytes:
        return base64.b64decode(self.sha256, validate=True)

    @field_validator("sha256")
    @classmethod
    def _base64_digests(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
        if len(raw) % DIGEST:
            raise ValueError(f"{len(raw)} bytes, not a whole number of {DIGEST}-byte digests")
        return value


class ArtifactEntry(_Entry):
    kind: Literal["volume", "database"]
    name: str = Field(min_length=1)
    source: str = ""
    compression: Literal["zstd", "gzip"]
    encryption: Literal["age"] | None = None
    status: Literal["running", "succeeded", "partial", "failed"]
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^([0-9a-f]{64})?$")
    error: str | None = None
    destinations: list[CopyEntry] = []
    blocks: BlocksEntry | None = None
    excludes: list[str] = []
    file_count: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _blocks_cover_the_copy(self) -> "ArtifactEntry":
        if self.blocks is not None:
            if self.size is None:
                raise ValueError("block digests of an artifact without a size")
            count = len(self.blocks.digests()) // DIGEST
            expected = -(-self.size // self.blocks.size)
            if count != expected:
                raise ValueError(f"{count} block digests for {self.size} bytes in blocks of {self.blocks.size}")
        seen = [(c.destination, c.key) for c in self.destinations]
        if len(set(seen)) != len(seen):
            raise ValueError("the same copy listed twice")
        return self


class BackupManifest(_Entry):
    format: Literal[1]
    id: str = Field(min_length=1)
    job: str = Field(min_length=1)
    status: Literal["succeeded", "partial", "failed"]  # a manifest is never written while running
    started_at: str
    finished_at: str | None = None
    error: str | None = None
    host: str | None = None
    warnings: list[str] = []
    artifacts: list[ArtifactEntry]

    @field_validator("started_at", "finished_at")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is None:
            raise ValueError("a time without a time zone")  # fromisoformat's ValueError names a bad one
        return value

    @field_validator("id", "job")
    @classmethod
    def _one_path_part(cls, value: str) -> str:
        if "/" in value or value in (".", ".."):
            raise ValueError("not a single path component")
        return value


def read_manifest(raw: bytes, key: str) -> BackupManifest:
    """Parse and check a manifest read from `key`; raise BadManifest saying what is wrong."""
    if len(raw) > MAX_MANIFEST:
        raise BadManifest(f"larger than {MAX_MANIFEST >> 20} MiB")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested ten thousand deep
        raise BadManifest(f"not JSON: {str(exc)[:200]}") from None
    try:
        record = BackupManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise BadManifest(f"{where}: {first['msg']}"
                          + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")) from None
    if key != manifest_key(record.job, record.id):
        raise BadManifest(f"it describes backup {record.id} of job {record.job}, "
                          f"whose manifest is {manifest_key(record.job, record.id)}")
    return record


def in_own_directory(record: BackupManifest, key: str) -> bool:
    """Whether an object key lies beside the manifest, in its backup's own directory."""
    directory, _, name = key.rpartition("/")
    return directory == f"{record.job}/{record.id}" and name not in ("", ".", "..", MANIFEST)


__all__ = ["ArtifactEntry", "BackupManifest", "BadManifest", "CopyEntry", "FORMAT", "in_own_directory",
           "manifest_key", "manifest_of", "read_manifest"]
