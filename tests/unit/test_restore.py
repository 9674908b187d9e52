"""Restore writes, and verify parses, only bytes proven block by block, on real SQLite,
real local stores and a fake engine that records what its tar would have unpacked."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import threading
from pathlib import Path
from typing import Iterable

import pytest
from sqlalchemy import delete

import backupd.artifact
from backupd.artifact import proven_blocks, store_artifact
from backupd.catalog import COPY_FAILED, Catalog
from backupd.catalog.models import ArtifactBlocksRow
from backupd.config import Compression, parse_config
from backupd.errors import BackupdError, IntegrityError
from backupd.restore import find_good_copy, restore_volume
from backupd.storage.local import LocalStore
from backupd.stream import BLOCK
from backupd.verify import verify_backup


def tar_of(size: int) -> bytes:
    """A tar of incompressible files: its zstd copy spans several blocks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, part in enumerate(range(0, size, 3 << 20)):
            data = os.urandom(min(3 << 20, size - part))
            info = tarfile.TarInfo(f"./f{i}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class SwappingStore(LocalStore):
    """A destination whose object is changed by someone after `reads` reads of it."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(name, root)
        self.reads = 0
        self.swap_after: int | None = None

    def open_read(self, key):
        if self.swap_after is not None and self.reads == self.swap_after:
            path = self.root / key
            data = bytearray(path.read_bytes())
            data[len(data) * 2 // 3] ^= 0xFF  # a later block: the earlier ones stay good
            path.write_bytes(bytes(data))
        self.reads += 1
        return super().open_read(key)


class FakeHost:
    """The engine operations restore uses; tar_extract keeps every byte tar would have read."""

    def __init__(self) -> None:
        self.volumes: dict[str, bytes] = {}
        self.received: list[bytes] = []  # each extract attempt's bytes, even a failed one

    def check_helper_image(self) -> None:
        pass

    def volume_exists(self, name: str) -> bool:
        return name in self.volumes

    def volume_is_empty(self, name: str) -> bool:
        return not self.volumes[name]

    def running_containers_using(self, name: str) -> list:
        return []

    def create_volume(self, name: str) -> None:
        self.volumes[name] = b""

    def remove_volume(self, name: str) -> None:
        self.volumes.pop(name, None)

    def clear_volume(self, name: str) -> None:
        self.volumes[name] = b""

    def tar_extract(self, volume: str, chunks: Iterable[bytes], purpose: str) -> None:
        self.received.append(b"")
        for chunk in chunks:
            self.received[-1] += bytes(chunk)
            self.volumes[volume] += bytes(chunk)


@pytest.fixture
def env(tmp_path: Path):
    config = parse_config({
        "catalog": f"sqlite:///{tmp_path}/catalog.db",
        "destinations": {"a": {"type": "local", "path": str(tmp_path / "a")},
                         "b": {"type": "local", "path": str(tmp_path / "b")}},
        "jobs": {"j": {"volumes": ["v"]}},
    }, env={})
    catalog = Catalog(config.catalog)
    stores = {"a": SwappingStore("a", tmp_path / "a"), "b": SwappingStore("b", tmp_path / "b")}
    tar = tar_of(10 << 20)
    backup_id = catalog.start_backup("j")
    store_artifact(catalog=catalog, backup_id=backup_id, job="j", kind="volume", name="v", source="volume:v",
                   open_source=lambda: contextlib.nullcontext([tar]), stores=stores,
                   compression=Compression(level=1))
    catalog.finish_backup(backup_id)
    return config, catalog, stores, backup_id, tar


def forget_blocks(catalog: Catalog) -> None:
    """As a backup stored before block digests, or imported without them, looks."""
    with catalog.session() as s, s.begin():
        s.execute(delete(ArtifactBlocksRow))


def use_stores(monkeypatch, stores) -> None:
    """restore opens the config's destinations: hand it these instances instead."""
    monkeypatch.setattr("backupd.restore.configured_stores", lambda config: stores)


def unpacked(tar: bytes) -> bytes:
    """What the guard passes on of a whole archive: up to its end-of-archive mark."""
    from backupd.tarsafety import guarded

    return b"".join(bytes(c) for c in guarded([tar]))


def test_the_proving_read_computes_the_block_digests_new_backups_record(env):
    config, catalog, stores, backup_id, _ = env
    artifact = catalog.get(backup_id).artifacts[0]
    recorded = catalog.blocks(artifact.id)
    assert recorded is not None and recorded[0] == BLOCK and len(recorded[1]) > 2 * 32  # several blocks
    forget_blocks(catalog)
    _, copy, blocks = find_good_copy(catalog.get(backup_id), artifact, stores, ["a", "b"], None,
                                     check_tar=False, known=None)
    assert copy.destination == "a" and blocks == recorded


def test_without_block_digests_a_copy_swapped_after_it_was_proven_is_never_written(env, monkeypatch):
    """The first read proves the copy whole; the second, which writes, is proven block by block
    against digests from the first. Swapped in between, the copy on `a` fails at its bad block
    (tar got only good blocks, and the volume is removed again) and `b` restores."""
    config, catalog, stores, backup_id, tar = env
    forget_blocks(catalog)
    use_stores(monkeypatch, stores)
    stores["a"].swap_after = 1
    host = FakeHost()
    restore_volume(config=config, catalog=catalog, host=host, backup_id=backup_id, volume="v")
    failed, restored = host.received
    assert tar.startswith(failed) and len(failed) < len(tar) // 2
    assert restored == host.volumes["v"] == unpacked(tar)
    assert (stores["a"].reads, stores["b"].reads) == (2, 2)


def test_force_without_block_digests_proves_each_block_in_the_pass_that_writes(env, monkeypatch):
    config, catalog, stores, backup_id, tar = env
    forget_blocks(catalog)
    use_stores(monkeypatch, stores)
    host = FakeHost()
    host.volumes["v"] = b"old contents"
    stores["a"].swap_after = 2  # proven whole, members checked, then swapped before the write
    with pytest.raises(IntegrityError, match=r"copy on 'a' .*: block \d+ .* does not match"):
        restore_volume(config=config, catalog=catalog, host=host, backup_id=backup_id, volume="v", force=True)
    [written] = host.received
    assert tar.startswith(written) and len(written) < len(tar)


def test_force_without_block_digests_checks_members_only_of_proven_bytes(env, monkeypatch):
    """The member check before the volume is emptied parses bytes proven by a first read."""
    config, catalog, stores, backup_id, tar = env
    forget_blocks(catalog)
    use_stores(monkeypatch, stores)
    stores["a"].swap_after = 1  # between the proving read and the member check
    host = FakeHost()
    host.volumes["v"] = b"old contents"
    restore_volume(config=config, catalog=catalog, host=host, backup_id=backup_id, volume="v", force=True)
    assert host.volumes["v"] == unpacked(tar)  # from b: a failed its member check, nothing was emptied for it
    assert stores["b"].reads == 3


def recorded_decompression(monkeypatch) -> list[bytes]:
    """Every stored byte handed to the decompressor."""
    seen: list[bytes] = []
    real = backupd.artifact.decompressed

    def spy(chunks, algorithm):
        def tee():
            for chunk in chunks:
                seen.append(bytes(chunk))
                yield chunk
        return real(tee(), algorithm)

    monkeypatch.setattr(backupd.artifact, "decompressed", spy)
    return seen


@pytest.mark.parametrize("with_digests", [True, False], ids=["block-digests", "older-backup"])
def test_verify_never_decompresses_bytes_that_do_not_prove_their_checksum(env, monkeypatch, with_digests):
    config, catalog, stores, backup_id, _ = env
    if not with_digests:
        forget_blocks(catalog)
    copy = catalog.get(backup_id).artifacts[0].copies[0]
    path = stores["a"].root / copy.key
    good = path.read_bytes()
    path.write_bytes(good[:BLOCK] + bytes(len(good) - BLOCK))  # block 1 on overwritten with zeros
    seen = recorded_decompression(monkeypatch)
    results = verify_backup(config, catalog, {"a": stores["a"]}, backup_id)
    [result] = [r for r in results if r.destination == "a"]
    assert not result.ok and result.detail.startswith("corrupt")
    assert catalog.get(backup_id).artifacts[0].copies[0].status == COPY_FAILED
    assert good.startswith(b"".join(seen))  # only good blocks reached the decompressor


class EndlessStore(LocalStore):
    """An object overwritten with a stream that never ends."""

    def open_read(self, key):
        class Endless(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, b):
                b[:] = bytes(len(b))
                return len(b)
        return io.BufferedReader(Endless())


@pytest.mark.parametrize("with_digests", [True, False], ids=["block-digests", "older-backup"])
def test_verify_of_an_object_that_never_ends_fails_promptly(env, with_digests, tmp_path):
    config, catalog, stores, backup_id, _ = env
    if not with_digests:
        forget_blocks(catalog)
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(
        verify_backup(config, catalog, {"a": EndlessStore("a", tmp_path / "a")}, backup_id)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "verify hung on an endless object"
    [result] = [r for r in results if r.destination == "a"]
    assert not result.ok and result.detail.startswith("corrupt")


def test_known_block_digests_are_used_as_they_are(env):
    config, catalog, stores, backup_id, _ = env
    artifact = catalog.get(backup_id).artifacts[0]
    known = catalog.blocks(artifact.id)
    stores["a"].reads = 0
    assert proven_blocks(stores["a"], artifact.copies[0], artifact, known) is known
    assert stores["a"].reads == 0  # no proving read: one read restores


def test_a_backup_without_any_good_copy_names_every_problem(env, monkeypatch):
    config, catalog, stores, backup_id, _ = env
    forget_blocks(catalog)
    use_stores(monkeypatch, stores)
    for store in stores.values():
        store.swap_after = 0
    host = FakeHost()
    with pytest.raises(BackupdError, match="no good copy of volume 'v': copy on 'a'.*; copy on 'b'"):
        restore_volume(config=config, catalog=catalog, host=host, backup_id=backup_id, volume="v")
    assert host.received == [] and "v" not in host.volumes
