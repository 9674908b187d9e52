"""The byte pipeline: compression round trips, hashing of stored bytes, fan-out isolation."""

from __future__ import annotations

import gzip
import hashlib
import os

import pytest
import zstandard

from backupd.errors import IntegrityError
from backupd.stream import (
    BlockDigests,
    FanOut,
    Progress,
    build_pipeline,
    checked_blocks,
    decompressed,
    human_bytes,
    suffix_for,
)


class Memory:
    def __init__(self, fail_after: int | None = None, fail_commit: bool = False):
        self.data = bytearray()
        self.committed = self.aborted = False
        self.fail_after = fail_after
        self.fail_commit = fail_commit

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.data) + len(data) > self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        self.data += data

    def commit(self) -> None:
        if self.fail_commit:
            raise OSError("disk full")
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


def payload() -> bytes:
    return os.urandom(300_000) + b"compressible text\n" * 200_000


@pytest.mark.parametrize("algorithm", ["zstd", "gzip"])
def test_round_trip_and_hash_is_of_stored_bytes(algorithm):
    out = Memory()
    fan = FanOut({"a": out})
    pipe = build_pipeline(fan, algorithm, 3)
    data = payload()
    for i in range(0, len(data), 32_768):  # Docker-frame-sized writes
        pipe.write(data[i:i + 32_768])
    pipe.close()
    result = fan.result()
    assert out.committed and not out.aborted
    assert result.size == len(out.data) < len(data)
    assert result.sha256 == hashlib.sha256(out.data).hexdigest()
    assert result.blocks == hashlib.sha256(out.data).digest()  # under 4 MiB stored: one block
    assert b"".join(decompressed([bytes(out.data)], algorithm)) == data
    # and standard tools read it too
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(bytes(out.data)) \
        if algorithm == "zstd" else gzip.decompress(bytes(out.data))
    assert plain == data


def test_one_failing_output_does_not_stop_the_others():
    good, bad = Memory(), Memory(fail_after=10)
    fan = FanOut({"good": good, "bad": bad})
    pipe = build_pipeline(fan, "zstd", 1)
    pipe.write(payload())
    pipe.close()
    result = fan.result()
    assert good.committed and bad.aborted and not bad.committed
    assert set(result.errors) == {"bad"} and "connection reset" in result.errors["bad"]


def test_commit_failure_is_recorded_as_that_copy_failing():
    ok, full = Memory(), Memory(fail_commit=True)
    fan = FanOut({"ok": ok, "full": full})
    fan.write(b"x")
    fan.close()
    assert fan.result().errors == {"full": "disk full"}
    assert full.aborted and ok.committed


def test_abort_on_source_failure_commits_nothing():
    a, b = Memory(), Memory()
    fan = FanOut({"a": a, "b": b})
    fan.write(b"partial")
    fan.abort("helper died")
    assert a.aborted and b.aborted and not a.committed and not b.committed


def test_truncated_gzip_is_detected():
    data = gzip.compress(b"x" * 100_000)
    with pytest.raises(ValueError, match="truncated"):
        b"".join(decompressed([data[: len(data) // 2]], "gzip"))


def test_truncated_zstd_yields_less_not_silence():
    data = zstandard.ZstdCompressor().compress(os.urandom(200_000))
    out = b"".join(decompressed([data[:1000]], "zstd"))
    assert len(out) < 200_000  # read_copy's size/sha256 check catches this case


def test_suffixes():
    assert suffix_for("zstd") == ".tar.zst"
    assert suffix_for("gzip", encrypted=True) == ".tar.gz.age"


def test_progress_is_silent_when_not_a_tty(capsys):
    p = Progress("x")
    p.update(10)
    p.done()
    assert capsys.readouterr().err == ""


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    # each unit up to 1024 of it, and TiB without limit
    assert [human_bytes(n) for n in (1023, 1024, 1024**2 - 1, 1024**2, 1024**4 - 1, 1024**4, 1024**5)] == [
        "1023 B", "1.0 KiB", "1024.0 KiB", "1.0 MiB", "1024.0 GiB", "1.0 TiB", "1024.0 TiB"]
    assert human_bytes(-1536) == "-1.5 KiB" and human_bytes(0) == "0 B"


@pytest.mark.parametrize("algorithm", ["zstd", "gzip"])
def test_decompression_output_is_bounded_even_for_highly_compressible_data(algorithm):
    from backupd.stream import CHUNK

    zeros = bytes(64 << 20)  # a sparse file's holes: megabytes from a few kilobytes
    packed = zstandard.ZstdCompressor().compress(zeros) if algorithm == "zstd" else gzip.compress(zeros, 1)
    assert len(packed) < 1 << 20
    total = 0
    for piece in decompressed([packed], algorithm):
        assert len(piece) <= CHUNK
        total += len(piece)
    assert total == len(zeros)


def test_decompression_reads_the_source_to_its_end():
    seen = []

    def source():
        yield zstandard.ZstdCompressor().compress(b"data")
        seen.append("end reached")

    assert b"".join(decompressed(source(), "zstd")) == b"data"
    assert seen == ["end reached"]


def test_prefetched_yields_everything_in_order_then_the_error():
    from backupd.stream import prefetched

    def source():
        yield from (bytes([i]) * 10 for i in range(50))
        raise ValueError("checksum mismatch at the end")

    got = []
    with pytest.raises(ValueError, match="checksum mismatch"):
        for chunk in prefetched(source(), depth=2):
            got.append(chunk)
    assert got == [bytes([i]) * 10 for i in range(50)]


def test_prefetched_abandoned_by_its_reader_releases_the_source():
    import threading

    from backupd.stream import prefetched

    released = threading.Event()

    def source():
        try:
            while True:
                yield b"x" * 100
        finally:
            released.set()  # e.g. the store's file or connection is closed

    reader = prefetched(source(), depth=2)
    assert next(reader) == b"x" * 100
    reader.close()  # the restore was cancelled
    assert released.wait(5)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def block_digests(data: bytes, block: int) -> bytes:
    return b"".join(hashlib.sha256(b).digest() for b in split(data, block))


@pytest.mark.parametrize("write_size", [1, 7, 100, 1000])
def test_block_digests_do_not_depend_on_how_the_bytes_arrive(write_size):
    data = os.urandom(1000)
    blocks = BlockDigests(size=64)
    for piece in split(data, write_size):
        blocks.update(piece)
    assert blocks.digests() == block_digests(data, 64)  # 16 blocks, the last one 40 bytes


@pytest.mark.parametrize("chunk", [10, 64, 100, 1000])
def test_checked_blocks_pass_good_copies_whole(chunk):
    data = os.urandom(1000)
    assert b"".join(checked_blocks(split(data, chunk), block_digests(data, 64), 64, "copy")) == data


def test_checked_blocks_hand_on_nothing_of_a_bad_block():
    data = os.urandom(1000)
    digests = block_digests(data, 64)
    bad = bytearray(data)
    bad[3 * 64 + 5] ^= 1
    passed = bytearray()
    with pytest.raises(IntegrityError, match="copy: block 3 .bytes from 192. does not match"):
        for piece in checked_blocks(split(bytes(bad), 100), digests, 64, "copy"):
            passed += piece
    assert bytes(passed) == data[:3 * 64]  # the proven blocks before it, not one byte more


@pytest.mark.parametrize("stored", [b"x" * 999, b"x" * 1001, b"x" * 960])
def test_checked_blocks_refuse_short_and_long_copies(stored):
    digests = block_digests(b"x" * 1000, 64)
    with pytest.raises(IntegrityError):
        b"".join(checked_blocks([stored], digests, 64, "copy"))


def test_iter_reader_hands_over_chunks_that_fit_and_splits_those_that_do_not():
    from backupd.stream import IterReader

    chunks = [b"abc", b"", b"defgh", b"ij"]
    reader = IterReader(chunks)
    assert reader.read(4) == b"abc"  # as it came, not filled up from the next chunk
    assert reader.read(4) == b"defg"  # the empty chunk is no end of file
    assert reader.read(4) == b"h"
    assert reader.read(4) == b"ij"
    assert reader.read(4) == b""
    assert IterReader(iter(chunks)).read() == b"abcdefghij"
