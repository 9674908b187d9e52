"""Error types that carry enough context for a one-line message to an operator.

Every error backupd raises on purpose is a BackupdError; the CLI prints its
message on one line and exits with its `exit_code`. Anything else is a bug.
"""

from __future__ import annotations


class BackupdError(Exception):
    """A failure the operator can act on; the message names what and where."""

    exit_code = 1


class ConfigError(BackupdError):
    """The config file (or a CLI argument) is wrong; nothing was touched."""

    exit_code = 2


class UnsafeNameError(ConfigError):
    """A database name (or user or host) that cannot be handed to a dump tool as a plain value;
    nothing was touched."""


class NameClashError(ConfigError):
    """Two artifacts of one job would get the same name (and so the same object key)."""


class NotFoundError(BackupdError):
    """A volume, container, backup id or destination object does not exist."""

    exit_code = 2


class RefusedError(BackupdError):
    """An operation was refused to protect data (e.g. overwrite without --force)."""

    exit_code = 3


class IntegrityError(BackupdError):
    """Stored bytes do not match the catalog (size, checksum) or the archive is unsafe."""

    exit_code = 4


class UnsafeArchiveError(IntegrityError):
    """An archive restore refuses to unpack: a member that could write outside the target,
    or a form the tar guard cannot judge. Bytes that prove their checksum are the same on
    every copy, so another copy cannot do better."""


class PartialError(BackupdError):
    """Some artifacts or copies landed and others did not."""

    exit_code = 5


class LabelError(ConfigError):
    """A container's `backupd.*` label is wrong: the job it belongs to is not run, other jobs are.

    Carries the container and the label, so `list --jobs` and the log can name both."""

    def __init__(self, container: str, label: str, message: str) -> None:
        super().__init__(f"container '{container}', label {label}: {message}")
        self.container = container
        self.label = label
        self.message = message
