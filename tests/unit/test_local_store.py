"""Local destination: visible under the final name only when complete."""

from __future__ import annotations

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
