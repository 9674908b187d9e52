"""verify: prove every stored copy of a backup, and optionally drill a restore.

Each copy is re-read from its destination and every block of it checked
against the SHA-256 the catalog holds for that block before it is decrypted
(when an identity is given), decompressed, and a volume archive's tar checked
member by member: bytes that do not prove their checksum are never parsed, so
an object overwritten on a destination fails at its first bad block. A copy
the catalog holds no block digests for (stored before them) is first read
whole and checked for size and SHA-256, its block digests computed on the way,
and then read again, block by block.

The catalog is changed only by what the copy itself proved: a copy whose
object is gone becomes `missing`, one whose bytes or contents are bad becomes
`failed` (restore then skips it), and one that was marked so by an earlier
verify and now checks out is `stored` again. A destination that cannot be
reached, or an identity that does not fit, says nothing about the copy and
changes nothing.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from backupd.artifact import prove_copy, proven_blocks, read_copy, stored_chunks
from backupd.catalog import COPY_FAILED, MISSING, STORED, ArtifactView, Catalog, CopyView
from backupd.config import Config
from backupd.errors import BackupdError, IntegrityError, NotFoundError
from backupd.storage import Store
from backupd.stream import IterReader
from backupd.tarsafety import check_tar_stream

log = logging.getLogger(__name__)

VERIFY_NOTE = "verify: "  # prefix of errors this module records, so a later verify may clear them


@dataclass(frozen=True)
class CopyCheck:
    artifact: str
    destination: str
    key: str
    ok: bool
    detail: str


def check_copy(store: Store, copy: CopyView, artifact: ArtifactView, identity: str | None,
               known: tuple[int, bytes] | None = None) -> str:
    """Return what was proven about one copy; raise BackupdError with what is wrong.

    `known` is the catalog's (block size, block digests) of the artifact, if any.
    """
    # Every block proven, and the count, is the whole copy proven: same size, same SHA-256.
    blocks = proven_blocks(store, copy, artifact, known)
    if artifact.encryption and identity is None:
        if known is not None:
            for _ in stored_chunks(store, copy, blocks):
                pass
        return "size and sha256 ok (encrypted: pass --identity to check the contents too)"
    reader = IterReader(read_copy(store, copy, artifact, identity, blocks))
    if artifact.kind == "volume":
        members = check_tar_stream(io.BufferedReader(reader, 1 << 20))
        reader.drain()
        return f"size and sha256 ok, {members} tar members well-formed and safe"
    reader.drain()
    return "size and sha256 ok, decompresses"


def _bytes_match(store: Store, copy: CopyView, artifact: ArtifactView) -> bool:
    try:
        prove_copy(store, copy, artifact)
    except IntegrityError:
        return False
    return True


def _checkable(copy: CopyView) -> bool:
    """Stored copies, and those an earlier verify found missing or bad (they may be back)."""
    return copy.status == STORED or (
        copy.status in (MISSING, COPY_FAILED) and (copy.error or "").startswith(VERIFY_NOTE))


def verify_copy(catalog: Catalog, backup_id: str, store: Store, copy: CopyView,
                artifact: ArtifactView, identity: str | None) -> tuple[bool, str]:
    """Check one copy and record in the catalog only what the check proved."""
    from backupd.crypto import DecryptionError

    def mark(status: str, detail: str | None) -> None:
        if (status, detail) != (copy.status, copy.error):
            catalog.set_copy_status(backup_id, copy.destination, copy.key, status, detail)

    try:
        detail = check_copy(store, copy, artifact, identity, catalog.blocks(artifact.id))
    except NotFoundError as exc:
        mark(MISSING, f"{VERIFY_NOTE}{exc}")
        return False, f"missing: {exc}"
    except DecryptionError as exc:
        if _bytes_match(store, copy, artifact):  # the copy is intact: the identity is wrong
            return False, f"{exc} (the stored bytes match the catalog: is --identity the right key?)"
        mark(COPY_FAILED, f"{VERIFY_NOTE}{exc}")
        return False, f"corrupt: {exc}"
    except IntegrityError as exc:
        mark(COPY_FAILED, f"{VERIFY_NOTE}{exc}")
        return False, f"corrupt: {exc}"
    except BackupdError as exc:  # unreachable, denied, no identity: nothing learnt about the copy
        return False, f"could not check: {exc}"
    mark(STORED, None)
    return True, detail


def verify_backup(
    config: Config,
    catalog: Catalog,
    stores: dict[str, Store],
    backup_id: str,
    identity: str | None = None,
    check_snapshot: Callable[[str, str, str], tuple[bool, str]] | None = None,
) -> list[CopyCheck]:
    """Check every copy; `check_snapshot(job, destination, snapshot id)` checks repository-mode copies."""
    backup = catalog.get(backup_id)
    results = []
    for art in backup.artifacts:
        label = f"{art.kind} {art.name}"
        for copy in art.copies:
            if copy.snapshot_id:  # checked by restic; the catalog's status is left as it is
                if copy.status != STORED:
                    results.append(CopyCheck(label, copy.destination, copy.key, False, f"not stored ({copy.status})"))
                    continue
                ok, detail = (False, "a snapshot in a repository: no restic checker given") \
                    if check_snapshot is None else check_snapshot(backup.job, copy.destination, copy.snapshot_id)
                (log.info if ok else log.error)("verify %s on %s: %s", label, copy.destination, detail)
                results.append(CopyCheck(label, copy.destination, copy.key, ok, detail))
                continue
            if not _checkable(copy):
                results.append(CopyCheck(label, copy.destination, copy.key, False,
                                         f"not stored ({copy.status}{': ' + copy.error if copy.error else ''})"))
                continue
            store = stores.get(copy.destination)
            if store is None:
                results.append(CopyCheck(label, copy.destination, copy.key, False,
                                         "destination is not in the current config"))
                continue
            ok, detail = verify_copy(catalog, backup_id, store, copy, art, identity)
            (log.info if ok else log.error)("verify %s on %s: %s", label, copy.destination, detail)
            results.append(CopyCheck(label, copy.destination, copy.key, ok, detail))
    return results


def restore_drill(config: Config, catalog: Catalog, host: Any, backup_id: str, identity: str | None) -> list[str]:
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
