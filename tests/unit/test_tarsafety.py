"""Archives are untrusted on restore: unsafe members are refused before anything is written."""

from __future__ import annotations

import io
import tarfile

import pytest

from backupd.errors import IntegrityError
from backupd.tarsafety import check_tar_stream


def archive(*members: tuple[str, str, str]) -> io.BytesIO:
    """members: (type, name, link target or content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = extra.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}[kind]
            info.linkname = extra
            tar.addfile(info)
    buf.seek(0)
    return buf


def test_ordinary_archive_passes_and_counts_members():
    tar = archive(("dir", "./", ""), ("dir", "./sub", ""), ("file", "./sub/a", "x"),
                  ("sym", "./sub/rel", "../sub/a"), ("sym", "./dangling", "nowhere/at/all"),
                  ("hard", "./sub/b", "./sub/a"))
    assert check_tar_stream(tar) == 6


@pytest.mark.parametrize("members,reason", [
    ([("file", "/etc/passwd", "x")], "absolute path"),
    ([("file", "../escape", "x")], "contains '..'"),
    ([("file", "a/../../escape", "x")], "contains '..'"),
    ([("sym", "link", "/etc")], "points outside"),
    ([("sym", "link", "../../etc")], "points outside"),
    ([("sym", "sub/link", "../..")], "points outside"),
    ([("sym", "link", "dir"), ("file", "link/passwd", "x")], "passes through symlink 'link'"),
    ([("hard", "h", "/etc/shadow")], "points outside"),
    ([("hard", "h", "../x")], "points outside"),
    ([("sym", "l", "d"), ("hard", "h", "l/x")], "passes through a symlink"),
])
def test_unsafe_members_are_refused(members, reason):
    with pytest.raises(IntegrityError, match=reason):
        check_tar_stream(archive(*members))


def test_a_symlink_replaced_by_a_directory_is_no_longer_a_trap():
    check_tar_stream(archive(("sym", "d", "x"), ("dir", "d", ""), ("file", "d/f", "y")))


def test_truncated_archive_is_not_well_formed():
    data = archive(("file", "a", "x" * 5000)).getvalue()
    with pytest.raises(IntegrityError, match="not a well-formed tar"):
        check_tar_stream(io.BytesIO(data[:700]))
