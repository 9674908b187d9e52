"""verify: prove every stored copy of a backup, and optionally drill a restore.

Each copy is re-read from its destination and checked for size and SHA-256
against the catalog; then it is decrypted (when an identity is given),
decompressed, and a volume archive's tar is checked member by member. A copy
found missing is marked missing in the catalog, a corrupt one failed, so
restore never picks it.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass

from backupd.artifact import read_copy, stored_chunks
from backupd.catalog import COPY_FAILED, MISSING, STORED, Catalog
from backupd.config import Config
from backupd.errors import BackupdError, NotFoundError
from backupd.storage import Store
from backupd.stream import IterReader
from backupd.tarsafety import check_tar_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyCheck:
    artifact: str
    destination: str
    key: str
    ok: bool
    detail: str


def check_copy(store: Store, copy, artifact, identity: str | None) -> str:
    """Return what was proven about one copy; raise BackupdError with what is wrong."""
    if artifact.encryption and identity is None:
        for _ in stored_chunks(store, copy, artifact):
            pass
        return "size and sha256 ok (encrypted: pass --identity to check the contents too)"
    reader = IterReader(read_copy(store, copy, artifact, identity))
    if artifact.kind == "volume":
        members = check_tar_stream(io.BufferedReader(reader, 1 << 20))
        reader.drain()
        return f"size and sha256 ok, {members} tar members well-formed and safe"
    reader.drain()
    return "size and sha256 ok, decompresses"


def verify_backup(
    config: Config,
    catalog: Catalog,
    stores: dict[str, Store],
    backup_id: str,
    identity: str | None = None,
) -> list[CopyCheck]:
    backup = catalog.get(backup_id)
    results = []
    for art in backup.artifacts:
        label = f"{art.kind} {art.name}"
        for copy in art.copies:
            if copy.status != STORED:
                results.append(CopyCheck(label, copy.destination, copy.key, False,
                                         f"not stored ({copy.status}{': ' + copy.error if copy.error else ''})"))
                continue
            store = stores.get(copy.destination)
            if store is None:
                results.append(CopyCheck(label, copy.destination, copy.key, False,
                                         "destination is not in the current config"))
                continue
            try:
                detail = check_copy(store, copy, art, identity)
                results.append(CopyCheck(label, copy.destination, copy.key, True, detail))
            except NotFoundError as exc:
                catalog.set_copy_status(backup_id, copy.destination, copy.key, MISSING, str(exc))
                results.append(CopyCheck(label, copy.destination, copy.key, False, f"missing: {exc}"))
            except BackupdError as exc:
                if "is encrypted" in str(exc) or "--identity" in str(exc):
                    results.append(CopyCheck(label, copy.destination, copy.key, False, str(exc)))
                    continue
                catalog.set_copy_status(backup_id, copy.destination, copy.key, COPY_FAILED, f"verify: {exc}")
                results.append(CopyCheck(label, copy.destination, copy.key, False, str(exc)))
    return results


def restore_drill(config: Config, catalog: Catalog, host, backup_id: str, identity: str | None) -> list[str]:
    """Restore each volume artifact into a scratch volume, then remove it."""
    from backupd.restore import restore_volume

    done = []
    for art in catalog.get(backup_id).artifacts:
        if art.kind != "volume":
            continue
        scratch = f"backupd-drill-{uuid.uuid4().hex[:12]}"
        try:
            restore_volume(config=config, catalog=catalog, host=host, backup_id=backup_id,
                           volume=art.name, to_volume=scratch, identity=identity)
            done.append(art.name)
        finally:
            host.remove_volume(scratch)
    return done
