"""verify records only what a copy proved: missing, corrupt, or good again."""

from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from backupd.artifact import store_artifact
from backupd.catalog import COPY_FAILED, MISSING, STORED, Catalog
from backupd.config import Compression, Encryption
from backupd.errors import BackupdError
from backupd.storage.local import LocalStore
from backupd.verify import verify_backup


def tar_bytes() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        data = b"payload " * 5000
        info = tarfile.TarInfo("./data.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Unreachable(LocalStore):
    def open_read(self, key):
        raise BackupdError(f"destination '{self.name}': cannot connect to 10.0.0.1:22: timed out")


@pytest.fixture
def setup(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    stores = {"a": LocalStore("a", tmp_path / "a"), "b": LocalStore("b", tmp_path / "b")}

    def backup(encryption: Encryption | None = None) -> str:
        backup_id = catalog.start_backup("j")
        store_artifact(catalog=catalog, backup_id=backup_id, job="j", kind="volume", name="v",
                       source="volume:v", open_source=lambda: contextlib.nullcontext([tar_bytes()]),
                       stores=stores, compression=Compression(), encryption=encryption)
        catalog.finish_backup(backup_id)
        return backup_id

    return catalog, stores, backup


def statuses(catalog: Catalog, backup_id: str) -> dict[str, str]:
    return {c.destination: c.status for c in catalog.get(backup_id).artifacts[0].copies}


def path_of(tmp_path: Path, catalog: Catalog, backup_id: str, dest: str) -> Path:
    return tmp_path / dest / catalog.get(backup_id).artifacts[0].copies[0].key


def test_good_copies_verify_with_their_tar_checked(setup):
    catalog, stores, backup = setup
    backup_id = backup()
    results = verify_backup(None, catalog, stores, backup_id)
    assert [r.ok for r in results] == [True, True]
    assert "1 tar members well-formed" in results[0].detail


def test_missing_copy_is_marked_missing_and_stored_again_once_it_is_back(setup, tmp_path):
    catalog, stores, backup = setup
    backup_id = backup()
    path = path_of(tmp_path, catalog, backup_id, "a")
    kept = path.read_bytes()
    path.unlink()
    results = verify_backup(None, catalog, stores, backup_id)
    assert [(r.destination, r.ok) for r in results] == [("a", False), ("b", True)]
    assert results[0].detail.startswith("missing")
    assert statuses(catalog, backup_id) == {"a": MISSING, "b": STORED}
    path.write_bytes(kept)
    assert all(r.ok for r in verify_backup(None, catalog, stores, backup_id))
    assert statuses(catalog, backup_id) == {"a": STORED, "b": STORED}


def test_corrupt_copy_is_marked_failed(setup, tmp_path):
    catalog, stores, backup = setup
    backup_id = backup()
    path = path_of(tmp_path, catalog, backup_id, "b")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    results = verify_backup(None, catalog, stores, backup_id)
    assert [r.ok for r in results] == [True, False] and results[1].detail.startswith("corrupt")
    assert statuses(catalog, backup_id) == {"a": STORED, "b": COPY_FAILED}


def test_unreachable_destination_fails_the_check_but_leaves_the_copy_stored(setup, tmp_path):
    catalog, stores, backup = setup
    backup_id = backup()
    stores["a"] = Unreachable("a", tmp_path / "a")
    results = verify_backup(None, catalog, stores, backup_id)
    assert not results[0].ok and "could not check" in results[0].detail and "cannot connect" in results[0].detail
    assert statuses(catalog, backup_id) == {"a": STORED, "b": STORED}


def test_wrong_identity_is_reported_without_blaming_the_copies(setup, tmp_path):
    catalog, stores, backup = setup
    right, wrong = tmp_path / "right.txt", tmp_path / "wrong.txt"
    for f in (right, wrong):
        subprocess.run(["age-keygen", "-o", str(f)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(right)], check=True,
                               capture_output=True, text=True).stdout.strip()
    backup_id = backup(Encryption(age_recipients=[recipient]))
    results = verify_backup(None, catalog, stores, backup_id, identity=str(wrong))
    assert not any(r.ok for r in results) and "right key" in results[0].detail
    assert statuses(catalog, backup_id) == {"a": STORED, "b": STORED}
    assert all(r.ok for r in verify_backup(None, catalog, stores, backup_id, identity=str(right)))
    without = verify_backup(None, catalog, stores, backup_id)
    assert all(r.ok and "pass --identity" in r.detail for r in without)
