"""Files and directories backupd makes are its own: 0700 directories and 0600 files,
whatever the umask, and a directory in a place backupd names itself is checked before use.

What the operator names (the catalog's directory, a destination's root) is trusted as
given, like the rest of the config; what is missing of it is created 0700. Below a
destination's root the layout (`<job>/<backup id>/`) is backupd's: every directory there
is opened without following symbolic links, one level at a time from the root, and must
be backupd's own and writable by nobody else. A directory another user could have
prepared (the sidecar's named-pipe directory in the state volume) must be exactly private:
a real directory, owned by backupd's uid, mode 0700.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from backupd.errors import RefusedError

DIR_MODE = 0o700
FILE_MODE = 0o600


class UnsafePathError(RefusedError):
    """A directory backupd would use could be read or replaced by someone else; nothing was written."""


def _problem(st: os.stat_result, *, exact: bool) -> str | None:
    """What is wrong with a directory's lstat for backupd's use, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by backupd's uid {os.geteuid()}"
    mode = stat.S_IMODE(st.st_mode)
    if exact and mode & 0o077:
        return f"has mode {mode:04o}: group or others can reach it (it must be 0700)"
    if not exact and mode & 0o022:
        return f"has mode {mode:04o}: group or others can write to it"
    return None


def check_private_dir(path: Path, what: str) -> None:
    """Refuse unless path is a real directory (not a link), backupd's own, mode 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"{what} {path} does not exist") from None
    problem = _problem(st, exact=True)
    if problem:
        raise UnsafePathError(f"{what} {path} {problem}; remove it (backupd makes its own)")


def private_dir(path: Path, what: str) -> Path:
    """Create path 0700 (its parent must exist), or adopt it only if it is exactly private."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    check_private_dir(path, what)
    return path


def make_dirs(path: Path) -> None:
    """Like `mkdir -p`, but every directory it creates is 0700 (mkdir -p gives parents 0755).

    Existing directories are left as they are: they are the operator's.
    """
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by another backupd (or the operator)


def open_layout_dir(root: Path, parts: list[str], create: bool) -> int:
    """An O_DIRECTORY fd of root/parts..., walked without following links; the caller closes it.

    root is the operator's (created 0700 if missing). Each part below it is created 0700
    when `create`, and must be a real directory of backupd's that nobody else can write to:
    another user who can write to root must not be able to point an archive elsewhere.
    """
    if create:
        make_dirs(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    here = Path(root)
    try:
        for part in parts:
            here = here / part
            if create:
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    raise UnsafePathError(f"{here} {_problem(st, exact=False)}; backupd writes only into "
                                          "directories of its own there") from None
                raise
            os.close(fd)
            fd = child
            problem = _problem(os.fstat(fd), exact=False)
            if problem:
                raise UnsafePathError(f"{here} {problem}; backupd writes only into directories of its own there")
        return fd
    except BaseException:
        os.close(fd)
        raise


def create_private_file(path: Path) -> bool:
    """Create an empty file 0600 unless something is there already; True if it was created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True
