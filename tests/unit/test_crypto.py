"""age encryption streams through the pipeline and back."""

from __future__ import annotations

import os
import subprocess

import pytest

from backupd.config import Encryption
from backupd.crypto import age_decrypt, age_encrypter
from backupd.errors import IntegrityError
from backupd.stream import FanOut, build_pipeline, decompressed


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b

    def commit(self):
        pass

    def abort(self):
        pass


@pytest.fixture
def keypair(tmp_path):
    identity = tmp_path / "id.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                               capture_output=True, text=True).stdout.strip()
    return str(identity), recipient


def test_encrypted_stream_round_trips(keypair):
    identity, recipient = keypair
    sink = Sink()
    fan = FanOut({"s": sink})
    pipe = build_pipeline(fan, "zstd", 3, encrypt=age_encrypter(Encryption(age_recipients=[recipient])))
    data = os.urandom(3_000_000) + b"text" * 500_000
    for i in range(0, len(data), 65536):
        pipe.write(data[i:i + 65536])
    pipe.close()
    stored = bytes(sink.data)
    assert stored.startswith(b"age-encryption.org/v1") and fan.result().size == len(stored)
    chunks = [stored[i:i + 100_000] for i in range(0, len(stored), 100_000)]
    assert b"".join(decompressed(age_decrypt(chunks, identity), "zstd")) == data


def test_wrong_identity_fails_as_integrity_error(keypair, tmp_path):
    _, recipient = keypair
    other = tmp_path / "other.txt"
    subprocess.run(["age-keygen", "-o", str(other)], check=True, capture_output=True)
    sink = Sink()
    pipe = build_pipeline(FanOut({"s": sink}), "gzip", 1, encrypt=age_encrypter(Encryption(age_recipients=[recipient])))
    pipe.write(b"hello")
    pipe.close()
    with pytest.raises(IntegrityError, match="age decryption failed"):
        b"".join(age_decrypt([bytes(sink.data)], str(other)))


def test_errors_of_the_source_surface_through_decryption(keypair):
    identity, _ = keypair

    def source():
        yield b"age-encryption.org/v1\n"
        raise IntegrityError("sha256 mismatch")

    with pytest.raises(IntegrityError):
        b"".join(age_decrypt(source(), identity))
