"""A backup judges its own tar stream as restore will: an archive restore would refuse
fails at backup time, naming the member, and no copy of it is stored."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import pytest

from backupd.artifact import store_artifact
from backupd.catalog import Catalog
from backupd.config import Compression
from backupd.docker_host import HelperError
from backupd.errors import IntegrityError, UnsafeArchiveError
from backupd.storage.local import LocalStore
from tests.unit.test_tarsafety import archive


@pytest.fixture
def backup(tmp_path: Path):
    catalog = Catalog(f"sqlite:///{tmp_path}/catalog.db")
    stores = {"a": LocalStore("a", tmp_path / "a")}

    def run(source, check_tar: bool = True):
        backup_id = catalog.start_backup("j")
        opener = source if callable(source) else (lambda: contextlib.nullcontext(source))
        try:
            return store_artifact(catalog=catalog, backup_id=backup_id, job="j", kind="volume", name="v",
                                  source="volume:v", open_source=opener, stores=stores,
                                  compression=Compression(), check_tar=check_tar)
        finally:
            catalog.finish_backup(backup_id)

    def stored() -> list[Path]:
        return sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())

    return run, catalog, stored


def chunked(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_an_archive_restore_accepts_is_stored_byte_for_byte_as_without_the_check(backup):
    run, catalog, stored = backup
    data = archive(("dir", "./", ""), ("sym", "./python3", "/usr/bin/python3.11"),
                   ("file", "./big", "x" * 300_000), ("hard", "./same", "./big")).getvalue()
    data += bytes(20_000)  # tar's record padding after the end mark is stored too
    assert run(chunked(data)) == "succeeded"
    [path] = stored()
    assert run(chunked(data), check_tar=False) == "succeeded"
    assert [hashlib.sha256(p.read_bytes()).digest() for p in stored()] == [hashlib.sha256(path.read_bytes()).digest()] * 2
    assert all(a.status == "succeeded" for b in catalog.list() for a in b.artifacts)


def test_an_archive_restore_would_refuse_fails_naming_the_member_and_stores_nothing(backup):
    run, catalog, stored = backup
    data = archive(("sym", "./l", "/etc"), ("file", "./l/passwd", "x")).getvalue()
    with pytest.raises(UnsafeArchiveError, match=r"volume 'v' would not restore, so it is not stored: "
                                                 r"unsafe archive: member './l/passwd' passes through symlink 'l'"):
        run(chunked(data, 100))
    assert stored() == []
    [b] = catalog.list()
    assert b.status == "failed" and "member './l/passwd'" in b.artifacts[0].error


def test_a_stream_that_is_not_tar_fails_and_stores_nothing(backup):
    run, catalog, stored = backup
    with pytest.raises(IntegrityError, match="would not restore.*not a well-formed tar"):
        run(chunked(os.urandom(50_000)))
    with pytest.raises(IntegrityError, match="ends in the middle of a member"):
        run(chunked(archive(("file", "./f", "x" * 5000)).getvalue()[:2048]))
    assert stored() == []


def test_a_helper_that_fails_mid_stream_is_blamed_before_the_garbage_it_wrote(backup):
    """Its exit status, checked when its stream ends, names the real cause."""
    run, catalog, stored = backup
    read = []

    @contextlib.contextmanager
    def dying_helper():
        def chunks():
            for chunk in chunked(os.urandom(50_000)):
                read.append(chunk)
                yield chunk
            raise HelperError("helper for volume 'v' exited 2: tar: read error: Input/output error")
        yield chunks()

    with pytest.raises(HelperError, match="Input/output error"):
        run(dying_helper)
    assert len(read) == 50 and stored() == []
