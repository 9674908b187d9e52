"""Encryption at rest with age, streamed through the `age` binary.

The sidecar needs only recipients (public keys); restore takes an identity
file. age runs as a subprocess fed and drained by threads, so memory stays
bounded and the pipeline keeps its push shape. The stored (encrypted) bytes
are what the catalog's sha256 covers, so copies verify without the key.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

from backupd.config import Encryption
from backupd.errors import BackupdError, ConfigError, IntegrityError
from backupd.stream import CHUNK, Writer


class DecryptionError(IntegrityError):
    """age could not decrypt: the bytes are damaged, or the identity is not a recipient's."""


def _age() -> str:
    path = shutil.which("age")
    if path is None:
        raise ConfigError("encryption: the `age` program is not installed (Debian package `age`)")
    return path


def recipient_args(encryption: Encryption) -> list[str]:
    args: list[str] = []
    for recipient in encryption.age_recipients:
        args += ["--recipient", recipient]
    if encryption.age_recipients_file is not None:
        if not Path(encryption.age_recipients_file).is_file():
            raise ConfigError(f"encryption.age_recipients_file: '{encryption.age_recipients_file}' does not exist")
        args += ["--recipients-file", str(encryption.age_recipients_file)]
    return args


class AgeWriter:
    """Bytes written in come out encrypted to `downstream`, from a pump thread."""

    def __init__(self, downstream: Writer, args: list[str]) -> None:
        self.downstream = downstream
        self.proc = subprocess.Popen([_age(), "--encrypt", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.error: BaseException | None = None
        self.pump = threading.Thread(target=self._pump, name="age-encrypt", daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        try:
            while chunk := self.proc.stdout.read(CHUNK):
                self.downstream.write(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
            self.error = exc
            self.proc.kill()

    def _raise_pending(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, data: bytes) -> None:
        self._raise_pending()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self.pump.join()
            self._raise_pending()
            raise BackupdError(f"age stopped: {self._stderr()}") from None

    def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode("utf-8", "replace").strip()[-300:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.pump.join()
        code = self.proc.wait()
        self._raise_pending()
        if code != 0:
            raise BackupdError(f"age encryption failed (exit {code}): {self._stderr()}")
        self.downstream.close()


def age_encrypter(encryption: Encryption) -> Callable[[Writer], Writer]:
    args = recipient_args(encryption)
    _age()
    return lambda downstream: AgeWriter(downstream, args)


def age_decrypt(chunks: Iterable[bytes], identity_path: str) -> Iterator[bytes]:
    """Decrypt a stream of stored chunks with an identity file."""
    if not Path(identity_path).is_file():
        raise ConfigError(f"--identity: '{identity_path}' does not exist")
    proc = subprocess.Popen([_age(), "--decrypt", "--identity", identity_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    feed_error: list[BaseException] = []

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001 - e.g. the sha256 check of the source
            feed_error.append(exc)
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass

    feeder = threading.Thread(target=feed, name="age-decrypt", daemon=True)
    feeder.start()
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while chunk := proc.stdout.read(CHUNK):
            yield chunk
        feeder.join()
        code = proc.wait()
        if feed_error:
            raise feed_error[0]
        if code != 0:
            message = proc.stderr.read().decode("utf-8", "replace").strip()[-300:]
            raise DecryptionError(f"age decryption failed: {message}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
