"""Store one artifact (a volume archive or a dump) on every destination, and read it back.

This is the single path every byte of a backup takes: source chunks ->
compress -> [encrypt] -> hash -> each destination's atomic upload; the
catalog records the artifact before the first byte and the truth after the
last. Restore and verify read copies back through `read_copy`.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Iterator

import zstandard

from backupd.catalog import Catalog, CopyView, ArtifactView, STORED
from backupd.config import Compression, Encryption
from backupd.errors import BackupdError, IntegrityError
from backupd.names import encode_name
from backupd.storage.base import Store
from backupd.tarsafety import TarGuard
from backupd.stream import (
    BLOCK,
    CHUNK,
    AllOutputsFailed,
    BlockDigests,
    Digest,
    FanOut,
    Progress,
    ThreadedSink,
    build_pipeline,
    decompressed,
    checked_blocks,
    prefetched,
    read_chunks,
    suffix_for,
)

log = logging.getLogger(__name__)

SourceOpener = Callable[[], AbstractContextManager[Iterable[bytes]]]


class Cancelled(BackupdError):
    """The run was asked to stop (SIGTERM) and aborted cleanly."""


def check_cancel(cancel: threading.Event | None, what: str) -> None:
    """Raise Cancelled if the run was cancelled: between chunks of a stream, and between a
    run's steps (a run whose helper the cancel ended must not start the next one)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what}: backup cancelled")


def artifact_key(job: str, backup_id: str, kind: str, name: str, suffix: str) -> str:
    """Where a copy lives in every store: grouped by job and backup, named by what it holds
    (encoded, so a database called `a/b` or `..` is one plain file name)."""
    return f"{job}/{backup_id}/{kind}-{encode_name(name)}{suffix}"


def store_artifact(
    *,
    catalog: Catalog,
    backup_id: str,
    job: str,
    kind: str,
    name: str,
    source: str,
    open_source: SourceOpener,
    stores: dict[str, Store],
    compression: Compression,
    encryption: Encryption | None = None,
    cancel: threading.Event | None = None,
    check_tar: bool = False,
    excludes: tuple[str, ...] = (),
) -> str:
    """Stream one artifact to every store; return its status (succeeded/partial/failed).

    With check_tar (volumes), the tar stream is also judged by the tar guard as it passes,
    as restore will judge it: an archive restore would refuse is not stored, and the
    artifact fails with the guard's reason, naming the member. The guard also counts the
    members, recorded as the artifact's file count. `excludes` (the patterns the archive
    was made with) are recorded with it.
    """
    encrypter = None
    if encryption is not None:
        from backupd.crypto import age_encrypter

        encrypter = age_encrypter(encryption)
    suffix = suffix_for(compression.algorithm, encrypter is not None)
    keys = {dest: artifact_key(job, backup_id, kind, name, suffix) for dest in stores}
    art_id = catalog.add_artifact(backup_id, kind, name, source, compression.algorithm,
                                  "age" if encrypter else None, keys, excludes)
    logger = logging.LoggerAdapter(log, {"backup_id": backup_id, "job": job, "artifact": f"{kind}:{name}"})
    uploads, open_errors = {}, {}
    for dest, store in stores.items():
        try:
            uploads[dest] = store.open_upload(keys[dest])
        except Exception as exc:  # noqa: BLE001 - one destination must not sink the others
            open_errors[dest] = str(exc)
            logger.error("cannot start upload to %s: %s", dest, exc)
    if not uploads:
        catalog.finish_artifact(art_id, 0, "", open_errors)
        return "failed"
    fan = FanOut(uploads)
    sink = ThreadedSink(fan)  # hashing and uploads overlap with compression
    pipe = build_pipeline(sink, compression.algorithm, compression.effective_level,
                          compression.threads, encrypter)
    progress = Progress(f"{kind} {name}")
    logger.info("archiving %s %s to %s", kind, name, ", ".join(uploads))
    # The guard judges the stream in a thread of its own, alongside compression and uploads.
    guard = TarGuard() if check_tar else None
    watch = ThreadedSink(guard) if guard is not None else None
    refused: IntegrityError | None = None
    try:
        with open_source() as chunks:
            for chunk in chunks:
                check_cancel(cancel, f"{kind} '{name}'")
                if watch is not None and refused is None:
                    try:
                        watch.write(chunk)
                    except IntegrityError as exc:
                        refused = exc
                if refused is not None:
                    continue  # the rest is only read: a helper that failed says so first, at the end
                pipe.write(chunk)
                progress.update(len(chunk))
        if watch is not None and refused is None:
            try:
                watch.close()  # the guard's verdict on the whole stream, before any copy is committed
            except IntegrityError as exc:
                refused = exc
        if refused is not None:
            raise type(refused)(f"{kind} '{name}' would not restore, so it is not stored: {refused}")
        pipe.close()  # flushes and commits each upload: copies appear only now
    except AllOutputsFailed as exc:
        sink.stop()
        if watch is not None:
            watch.stop()
        progress.done()
        result = fan.result()
        catalog.finish_artifact(art_id, result.size, result.sha256, {**open_errors, **exc.errors})
        logger.error("%s %s reached no destination: %s", kind, name, exc)
        return "failed"
    except BaseException as exc:
        sink.stop(discard=True)
        if watch is not None:
            watch.stop(discard=True)
        progress.done()
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        if not fan.closed:
            fan.abort(f"source failed: {reason}")
        catalog.fail_artifact(art_id, reason)
        logger.error("%s %s failed: %s", kind, name, reason)
        raise
    progress.done()
    result = fan.result()
    status = catalog.finish_artifact(art_id, result.size, result.sha256, {**open_errors, **result.errors},
                                     blocks=(BLOCK, result.blocks),
                                     file_count=guard.checker.members if guard is not None else None)
    logger.info("%s %s %s: %d bytes stored, sha256 %s", kind, name, status, result.size, result.sha256)
    return status


def ordered_copies(artifact: ArtifactView, preference: list[str]) -> list[CopyView]:
    """Stored copies, the configured destinations first (in their order), then the rest."""
    stored = [c for c in artifact.copies if c.status == STORED]
    rank = {name: i for i, name in enumerate(preference)}
    return sorted(stored, key=lambda c: rank.get(c.destination, len(rank)))


def _where(copy: CopyView) -> str:
    """A copy as errors name it."""
    return f"copy on '{copy.destination}' ({copy.key})"


def prove_copy(store: Store, copy: CopyView, artifact: ArtifactView) -> tuple[int, bytes]:
    """Read a whole copy once, check it against the catalog's size and SHA-256, and
    return its (block size, block digests), computed on the way.

    For copies the catalog holds no block digests for (stored before them, or imported
    without them): a second read can then prove each block before it is used. Nothing
    read here is handed on, and reading stops as soon as the copy is longer than it should be.
    """
    digest, blocks = Digest(), BlockDigests(BLOCK)
    expected = artifact.size if artifact.size is not None else -1
    with store.open_read(copy.key) as fileobj:
        for chunk in read_chunks(fileobj, CHUNK):
            digest.update(chunk)
            if digest.size > expected:
                break
            blocks.update(chunk)
    if digest.size != expected or digest.sha256 != artifact.sha256:
        raise IntegrityError(
            f"{_where(copy)} does not match the catalog: "
            f"size {digest.size}{'+' if digest.size > expected else ''} vs {artifact.size}, "
            f"sha256 {digest.sha256[:16]}… vs {(artifact.sha256 or '')[:16]}…"
        )
    return BLOCK, blocks.digests()


def proven_blocks(store: Store, copy: CopyView, artifact: ArtifactView,
                  known: tuple[int, bytes] | None) -> tuple[int, bytes]:
    """The block digests to prove a read of this copy against: the catalog's, or,
    when it has none, those of a first read that proved the whole copy."""
    return known if known is not None else prove_copy(store, copy, artifact)


def stored_chunks(store: Store, copy: CopyView, blocks: tuple[int, bytes]) -> Iterator[bytes]:
    """The copy's bytes as stored, each block handed on only after its SHA-256 matched
    `blocks` (block size, digests); IntegrityError at the first block that does not."""
    with store.open_read(copy.key) as fileobj:
        yield from checked_blocks(read_chunks(fileobj, CHUNK), blocks[1], blocks[0], _where(copy))


def read_copy(
    store: Store,
    copy: CopyView,
    artifact: ArtifactView,
    identity: str | None,
    blocks: tuple[int, bytes],
) -> Iterator[bytes]:
    """Plain (decrypted, decompressed) bytes of a copy. Every block is proven against
    `blocks` (see proven_blocks) before it reaches the decrypter or decompressor."""
    where = _where(copy)
    # Reading and hashing overlap with decryption, decompression and unpacking.
    raw: Iterable[bytes] = prefetched(stored_chunks(store, copy, blocks))
    if artifact.encryption:
        from backupd.crypto import age_decrypt

        if identity is None:
            raise BackupdError(
                f"{artifact.kind} '{artifact.name}' is encrypted: pass --identity FILE with an age identity")
        raw = age_decrypt(raw, identity)
    try:
        yield from decompressed(raw, artifact.compression)
    except BackupdError:
        raise
    except (ValueError, OSError, zstandard.ZstdError) as exc:
        raise IntegrityError(f"{where} is corrupt: cannot be decompressed: {exc}") from None
