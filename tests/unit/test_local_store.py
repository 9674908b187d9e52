"""Local destination: visible under the final name only when complete."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backupd.errors import NotFoundError
from backupd.storage.local import LocalStore


def test_upload_is_invisible_until_commit(tmp_path: Path):
    store = LocalStore("local", tmp_path)
    up = store.open_upload("job/b1/volume-x.tar.zst")
    up.write(b"abc")
    assert store.stat("job/b1/volume-x.tar.zst") is None
    assert list(store.list()) == []  # the .partial file is not an object
    up.commit()
    assert store.stat("job/b1/volume-x.tar.zst").size == 3
    with store.open_read("job/b1/volume-x.tar.zst") as f:
        assert f.read() == b"abc"
    assert [o.key for o in store.list("job/")] == ["job/b1/volume-x.tar.zst"]


def test_abort_leaves_nothing(tmp_path: Path):
    store = LocalStore("local", tmp_path)
    up = store.open_upload("j/b/a.tar.zst")
    up.write(b"half")
    up.abort()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_commit_never_overwrites(tmp_path: Path):
    store = LocalStore("local", tmp_path)
    first = store.open_upload("j/b/a")
    first.write(b"1")
    first.commit()
    second = store.open_upload("j/b/a")
    second.write(b"2")
    with pytest.raises(Exception, match="refusing to overwrite"):
        second.commit()
    assert (tmp_path / "j/b/a").read_bytes() == b"1"


@pytest.mark.parametrize("key", ["/abs", "../up", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str):
    with pytest.raises(ValueError, match="invalid object key"):
        LocalStore("local", tmp_path).open_upload(key)


def test_missing_object_and_delete_is_idempotent(tmp_path: Path):
    store = LocalStore("local", tmp_path)
    with pytest.raises(NotFoundError):
        store.open_read("nope")
    store.delete("nope")


def test_a_read_drops_only_what_was_already_read_from_the_page_cache(tmp_path: Path, monkeypatch):
    """Restore and verify read a copy once: it must not stay in the page cache, and nothing ahead is dropped."""
    from backupd.storage import local

    data = os.urandom(3 * local.DROP_BEHIND + 12345)
    (tmp_path / "j").mkdir()
    (tmp_path / "j/a").write_bytes(data)
    dropped: list[tuple[int, int, int]] = []  # (offset, length, bytes read when advised)
    read_so_far = 0
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        dropped.append((offset, length, read_so_far))
        real(fd, offset, length, advice)

    monkeypatch.setattr(local.os, "posix_fadvise", advise)
    got = bytearray()
    with LocalStore("local", tmp_path).open_read("j/a") as f:
        while chunk := f.read(1 << 20):
            got += chunk
            read_so_far = len(got)
    assert bytes(got) == data
    assert len(dropped) == 3
    position = 0
    for offset, length, read_before in dropped:
        assert offset == position  # contiguous from the start: no gaps left cached
        position = offset + length
        assert position <= read_before + (1 << 20)  # never beyond what that read returned
    assert position == 3 * local.DROP_BEHIND


def test_a_file_system_that_refuses_the_advice_is_read_as_before(tmp_path: Path, monkeypatch):
    from backupd.storage import local

    data = os.urandom(2 * local.DROP_BEHIND + 1)
    (tmp_path / "a").write_bytes(data)

    def refuse(*_args: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(local.os, "posix_fadvise", refuse)
    with LocalStore("local", tmp_path).open_read("a") as f:
        assert f.read() == data
        f.seek(0)
        assert b"".join(iter(lambda: f.read(1 << 20), b"")) == data
