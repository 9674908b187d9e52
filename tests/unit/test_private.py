"""What backupd writes is its own: 0600 files and 0700 directories whatever the umask, and
no directory another local user prepared (a link, 0777, someone else's) is ever used."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from backupd.catalog import Catalog
from backupd.private import UnsafePathError, make_dirs, private_dir
from backupd.storage.local import LocalStore

OTHER_UID = 54321


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")


# ------------------------------------------------------------------ directories backupd adopts


def test_a_private_dir_is_created_0700_under_umask_022(tmp_path: Path, umask_022):
    made = private_dir(tmp_path / "fifo", "the named-pipe directory")
    assert mode(made) == 0o700


def test_a_private_dir_of_ours_is_adopted(tmp_path: Path):
    (tmp_path / "fifo").mkdir(mode=0o700)
    private_dir(tmp_path / "fifo", "the named-pipe directory")


@pytest.mark.parametrize("bits", [0o777, 0o755, 0o1777, 0o710])
def test_a_dir_others_can_reach_is_refused_naming_path_and_mode(tmp_path: Path, bits: int):
    path = tmp_path / "fifo"
    path.mkdir()
    path.chmod(bits)
    with pytest.raises(UnsafePathError, match=rf"the named-pipe directory {path} has mode {bits:04o}"):
        private_dir(path, "the named-pipe directory")


def test_a_link_to_a_private_looking_dir_is_refused(tmp_path: Path):
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    (tmp_path / "fifo").symlink_to(target)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        private_dir(tmp_path / "fifo", "the named-pipe directory")


def test_a_dir_owned_by_another_user_is_refused(tmp_path: Path):
    as_root()
    path = tmp_path / "fifo"
    path.mkdir(mode=0o700)
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePathError, match=f"is owned by uid {OTHER_UID}, not by backupd's uid 0"):
        private_dir(path, "the named-pipe directory")


def test_a_file_in_place_of_the_dir_is_refused(tmp_path: Path):
    (tmp_path / "fifo").write_text("")
    with pytest.raises(UnsafePathError, match="is not a directory"):
        private_dir(tmp_path / "fifo", "the named-pipe directory")


def test_the_error_is_refused_exit_3():
    assert UnsafePathError.exit_code == 3


def test_make_dirs_makes_every_missing_level_0700_and_leaves_existing_ones(tmp_path: Path, umask_022):
    tmp_path.chmod(0o755)
    make_dirs(tmp_path / "a" / "b" / "c")
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    assert mode(tmp_path) == 0o755


# ------------------------------------------------------------------ the local destination


def test_local_copies_are_0600_in_0700_directories_under_umask_022(tmp_path: Path, umask_022):
    root = tmp_path / "backups" / "here"
    store = LocalStore("local", root)
    for key in ("job/b1/volume-x.tar.zst", "job/b1/manifest.json"):
        up = store.open_upload(key)
        up.write(b"data")
        up.commit()
    for directory in (tmp_path / "backups", root, root / "job", root / "job" / "b1"):
        assert mode(directory) == 0o700, directory
    assert mode(root / "job/b1/volume-x.tar.zst") == 0o600
    assert mode(root / "job/b1/manifest.json") == 0o600


def test_an_existing_root_is_the_operators_and_keeps_its_mode(tmp_path: Path, umask_022):
    tmp_path.chmod(0o755)
    up = LocalStore("local", tmp_path).open_upload("j/b/a")
    up.write(b"x")
    up.commit()
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "j") == 0o700


def test_a_job_dir_from_an_older_backupd_0755_is_still_used(tmp_path: Path):
    (tmp_path / "j").mkdir(mode=0o755)
    up = LocalStore("local", tmp_path).open_upload("j/b/a")
    up.write(b"x")
    up.commit()
    assert (tmp_path / "j/b/a").read_bytes() == b"x"


def test_a_link_planted_in_a_shared_root_is_not_followed(tmp_path: Path):
    """Another user who can write to the root makes `<job>` a link to their directory first."""
    root, theirs = tmp_path / "shared", tmp_path / "theirs"
    root.mkdir()
    root.chmod(0o1777)
    theirs.mkdir()
    (root / "j").symlink_to(theirs)
    with pytest.raises(UnsafePathError, match=f"{root / 'j'} is a symbolic link"):
        LocalStore("local", root).open_upload("j/b/a")
    assert list(theirs.iterdir()) == []


def test_a_job_dir_another_user_made_in_a_shared_root_is_refused(tmp_path: Path):
    as_root()
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o1777)
    (root / "j").mkdir(mode=0o755)
    os.chown(root / "j", OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafePathError, match=f"{root / 'j'} is owned by uid {OTHER_UID}"):
        LocalStore("local", root).open_upload("j/b/a")
    assert list((root / "j").iterdir()) == []


def test_a_world_writable_backup_dir_is_refused(tmp_path: Path):
    (tmp_path / "j" / "b").mkdir(parents=True)
    (tmp_path / "j" / "b").chmod(0o777)
    with pytest.raises(UnsafePathError, match="group or others can write to it"):
        LocalStore("local", tmp_path).open_upload("j/b/a")


def test_a_link_in_place_of_the_final_name_is_never_written_through(tmp_path: Path):
    (tmp_path / "j" / "b").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    (tmp_path / "j" / "b" / "a").symlink_to(outside)
    up = LocalStore("local", tmp_path).open_upload("j/b/a")
    up.write(b"new")
    with pytest.raises(Exception, match="refusing to overwrite"):
        up.commit()
    assert outside.read_bytes() == b"keep"
    assert [p.name for p in (tmp_path / "j" / "b").iterdir()] == ["a"]


# ------------------------------------------------------------------ the catalog


def test_the_sqlite_catalog_and_its_directories_are_private_under_umask_022(tmp_path: Path, umask_022):
    path = tmp_path / "state" / "sub" / "catalog.db"
    catalog = Catalog(f"sqlite:///{path}")
    catalog.start_backup("j")
    made = sorted(p.name for p in path.parent.iterdir())
    assert "catalog.db" in made
    for name in made:  # the database and SQLite's -wal and -shm beside it
        assert mode(path.parent / name) == 0o600, name
    assert mode(tmp_path / "state") == mode(path.parent) == 0o700
    catalog.close()
