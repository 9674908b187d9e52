"""Where a dump tool or hook runs: inside a container (docker exec) or in backupd itself.

All runners answer the same two calls, so dump modules and hooks never care
where they run (HelperRunner: a fresh helper container that mounts the volume holding a
database file, for SQLite): `stream` (stdout as chunks, for dumps and restores) and `run`
(a short command with a timeout, for hooks and queries). Secrets travel in
the environment, never in argv, and are redacted (backupd.redaction) from any text we report.
"""

from __future__ import annotations

import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

from backupd.docker_host import STDERR_KEEP, DockerHost, HelperStartError
from backupd.errors import BackupdError

MISSING_COMMAND = (126, 127)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False  # stdout is only the last `keep` bytes of what the command printed


class Proc(Protocol):
    def stdout(self) -> Iterator[bytes]: ...
    def exit_code(self) -> int: ...
    def stderr_text(self) -> str: ...


class Runner(Protocol):
    where: str

    def stream(self, argv: list[str], env: dict[str, str],
               stdin: Iterable[bytes] | None = None) -> "contextmanager[Proc]": ...

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stdin: Iterable[bytes] | None = None, keep: int = STDERR_KEEP) -> Result: ...

    def deadline(self, timeout: float) -> list[str]:
        """An argv prefix that kills the command after `timeout` seconds, where that can be had."""
        ...


# `timeout -s KILL` as the exit code shows it: 124 (timed out), 137 (through docker exec) or -9
# (a local subprocess: timeout signals its whole process group, itself included).
KILLED_BY_TIMEOUT = (124, 137, -9)


def timeout_argv(timeout: float) -> list[str]:
    return ["timeout", "-s", "KILL", str(max(1, int(timeout)))]


def _collect(proc: Proc, timeout: float, keep: int) -> tuple[bytes, bool, bool]:
    """Drain stdout within timeout; (its last `keep` bytes, timed out?, truncated?)."""
    out = bytearray()
    truncated = False

    def drain() -> None:
        nonlocal truncated
        for chunk in proc.stdout():
            out.extend(chunk)
            if len(out) > keep:
                truncated = True
                del out[:-keep]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reader.join(timeout)
    return bytes(out), reader.is_alive(), truncated


class ContainerRunner:
    """docker exec in a running container."""

    def __init__(self, host: DockerHost, container: str) -> None:
        self.host = host
        self.container = container
        self.where = f"container '{container}'"
        self._has_timeout: bool | None = None

    @contextmanager
    def stream(self, argv: list[str], env: dict[str, str],
               stdin: Iterable[bytes] | None = None) -> Iterator[Proc]:
        with self.host.exec_stream(self.container, argv, env, stdin) as proc:
            yield proc

    def deadline(self, timeout: float) -> list[str]:
        """`timeout -s KILL N` where the container has it, so a hung hook or dump really dies."""
        if self._has_timeout is None:
            with self.host.exec_stream(self.container, ["timeout", "--help"], {}) as probe:
                probe.drain()
                self._has_timeout = probe.exit_code() not in MISSING_COMMAND
        return timeout_argv(timeout) if self._has_timeout else []

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stdin: Iterable[bytes] | None = None, keep: int = STDERR_KEEP) -> Result:
        wrapped = self.deadline(timeout) + argv
        with self.host.exec_stream(self.container, wrapped, env, stdin) as proc:
            out, timed_out, truncated = _collect(proc, timeout + 5, keep)
            code = proc.exit_code(timeout=5) if not timed_out else -1
            if wrapped[0] == "timeout" and code in KILLED_BY_TIMEOUT:
                timed_out = True
            return Result(code, out.decode("utf-8", "replace"), proc.stderr_text(), timed_out, truncated)


class HelperRunner:
    """Each command in a fresh helper container from `image`, with `mounts` (at the paths the
    database's own container sees them) and only the capabilities `caps`; removed afterwards."""

    def __init__(self, host: DockerHost, mounts: list, image: str | None, caps: Iterable[str], where: str) -> None:
        self.host = host
        self.mounts = list(mounts)
        self.image = image
        self.caps = tuple(caps)
        self.where = where
        self._has_timeout: bool | None = None

    @contextmanager
    def stream(self, argv: list[str], env: dict[str, str],
               stdin: Iterable[bytes] | None = None) -> Iterator[Proc]:
        if env:  # a helper's environment is visible to `docker inspect`: no secrets there
            raise BackupdError(f"{self.where}: a helper is given no environment")
        with self.host.helper_stream(argv, self.mounts, purpose=self.where, caps=self.caps, image=self.image,
                                     stdin=stdin) as proc:
            yield proc

    def deadline(self, timeout: float) -> list[str]:
        if self._has_timeout is None:
            self._has_timeout = self.run(["timeout", "--help"], {}, 60).code not in MISSING_COMMAND
        return timeout_argv(timeout) if self._has_timeout else []

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stdin: Iterable[bytes] | None = None, keep: int = STDERR_KEEP) -> Result:
        try:
            with self.stream(argv, env, stdin) as proc:
                out, timed_out, truncated = _collect(proc, timeout + 5, keep)
                code = proc.exit_code(timeout=5) if not timed_out else -1
                return Result(code, out.decode("utf-8", "replace"), proc.stderr_text(), timed_out, truncated)
        except HelperStartError as exc:  # as a shell reports a missing command
            return Result(127, "", str(exc))


class _LocalProc:
    def __init__(self, argv: list[str], env: dict[str, str], stdin: Iterable[bytes] | None) -> None:
        import os

        try:
            self.popen = subprocess.Popen(
                argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            raise BackupdError(f"'{argv[0]}' is not installed where backupd runs") from None
        self.stderr = bytearray()
        self.feed_error: BaseException | None = None
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()
        self._feeder = None
        if stdin is not None:
            self._feeder = threading.Thread(target=self._feed, args=(stdin,), daemon=True)
            self._feeder.start()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr.extend(line)
            del self.stderr[:-STDERR_KEEP]

    def _feed(self, chunks: Iterable[bytes]) -> None:
        assert self.popen.stdin is not None
        try:
            for chunk in chunks:
                self.popen.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001
            self.feed_error = exc
        finally:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass

    def stdout(self) -> Iterator[bytes]:
        assert self.popen.stdout is not None
        while chunk := self.popen.stdout.read(1 << 20):
            yield chunk

    def exit_code(self) -> int:
        if self._feeder is not None:
            self._feeder.join()
        code = self.popen.wait()
        self._err.join(timeout=5)
        return code

    def stderr_text(self) -> str:
        return bytes(self.stderr).decode("utf-8", "replace").strip()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


class LocalRunner:
    """A subprocess of backupd itself (network dumps, hooks without a container)."""

    where = "backupd"

    def deadline(self, timeout: float) -> list[str]:
        """coreutils' `timeout` (in backupd's image); without it, no deadline for streams."""
        import shutil

        return timeout_argv(timeout) if shutil.which("timeout") else []

    @contextmanager
    def stream(self, argv: list[str], env: dict[str, str],
               stdin: Iterable[bytes] | None = None) -> Iterator[Proc]:
        proc = _LocalProc(argv, env, stdin)
        try:
            yield proc
        finally:
            proc.kill()

    def run(self, argv: list[str], env: dict[str, str], timeout: float,
            stdin: Iterable[bytes] | None = None, keep: int = STDERR_KEEP) -> Result:
        proc = _LocalProc(argv, env, stdin)
        out, timed_out, truncated = _collect(proc, timeout, keep)
        if timed_out:
            proc.kill()
            return Result(-1, out.decode("utf-8", "replace"), proc.stderr_text(), True, truncated)
        return Result(proc.exit_code(), out.decode("utf-8", "replace"), proc.stderr_text(), False, truncated)
