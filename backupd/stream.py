"""The byte pipeline: compress, (encrypt,) hash and fan out one stream.

Data is pushed through a chain of writers, each with `write(bytes)` and
`close()`. Nothing is staged on disk and every stage holds at most a few
chunks, so memory stays bounded whatever the volume size. The hash and size
are of the bytes as stored (after compression and encryption), so anyone can
check a copy with `sha256sum` and no key.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Protocol

import zstandard

from backupd.errors import IntegrityError
from backupd.interrupts import held

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB: large enough to amortise per-call overhead, small for memory
# Stored bytes are also hashed per block, so a restore can prove each block before it
# writes it, instead of reading the whole copy twice. 4 MiB: 8 bytes of catalog per MiB
# stored, and a restore holds at most one unproven block.
BLOCK = 4 << 20
# zstd's smallest job (512 KiB) keeps its multithreaded buffers small: a backup to S3 peaked at
# 133 MB instead of 172 MB with 2 MiB jobs, at the same speed, for archives about 3% larger
# (a 194 MiB tar of text and code: 82.7 MiB instead of 80.3 MiB at level 3).
ZSTD_JOB_SIZE = 512 << 10


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


def suffix_for(algorithm: str, encrypted: bool = False) -> str:
    """File name suffix of an archive: .tar.zst, .tar.gz, plus .age when encrypted."""
    return ".tar." + {"zstd": "zst", "gzip": "gz"}[algorithm] + (".age" if encrypted else "")


class Compressor:
    """zstd (multithreaded) or gzip compression as a pass-through writer."""

    def __init__(self, downstream: Writer, algorithm: str, level: int, threads: int = 0) -> None:
        self.downstream = downstream
        if algorithm == "zstd":
            # An explicit job size bounds zstd's multithreaded buffers: left to itself,
            # level 3 holds about 200 MB (see ZSTD_JOB_SIZE).
            params = zstandard.ZstdCompressionParameters.from_level(
                level, threads=threads or -1, job_size=ZSTD_JOB_SIZE)
            self._obj = zstandard.ZstdCompressor(compression_params=params).compressobj(size=-1)
            self._flush = lambda: self._obj.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        elif algorithm == "gzip":
            self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)
            self._flush = self._obj.flush
        else:
            raise ValueError(f"unknown compression '{algorithm}'")

    def write(self, data: bytes) -> None:
        out = self._obj.compress(data)
        if out:
            self.downstream.write(out)

    def close(self) -> None:
        out = self._flush()
        if out:
            self.downstream.write(out)
        self.downstream.close()


def decompressed(chunks: Iterable[bytes], algorithm: str) -> Iterator[bytes]:
    """Decompress a stream of stored chunks into plain tar chunks of at most CHUNK bytes.

    Output is bounded per step: a few kilobytes of zstd can stand for gigabytes
    of zeros (sparse files), which must not land in memory at once.
    """
    source = iter(chunks)
    if algorithm == "zstd":
        reader = IterReader(source)
        yield from zstandard.ZstdDecompressor().read_to_iter(reader, read_size=CHUNK, write_size=CHUNK)
        reader.drain()  # checks at the end of the source must still run
        return
    if algorithm != "gzip":
        raise ValueError(f"unknown compression '{algorithm}'")
    obj = zlib.decompressobj(31)
    for chunk in source:
        data = chunk
        while data:
            out = obj.decompress(data, CHUNK)
            if out:
                yield out
            data = obj.unconsumed_tail
        if obj.eof:
            break
    while tail := obj.flush():
        yield tail
    if not obj.eof:
        raise ValueError("compressed stream is truncated")
    for _ in source:  # drain: checks at the end of the source must still run
        pass


@dataclass
class Digest:
    """SHA-256 and byte count of what passes through."""

    size: int = 0
    _sha: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    def update(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class BlockDigests:
    """SHA-256 of every `size` bytes that pass through (the last block may be shorter)."""

    def __init__(self, size: int = BLOCK) -> None:
        self.size = size
        self._done = bytearray()
        self._sha = hashlib.sha256()
        self._fill = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.size - self._fill)
            self._sha.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.size:
                self._done += self._sha.digest()
                self._sha, self._fill = hashlib.sha256(), 0

    def digests(self) -> bytes:
        """The 32-byte digests, concatenated in order."""
        return bytes(self._done) + (self._sha.digest() if self._fill else b"")


def checked_blocks(chunks: Iterable[bytes], digests: bytes, size: int, where: str) -> Iterator[bytes]:
    """Pass the chunks on a block at a time, each only after its SHA-256 matched.

    With every block proven and the count right, the whole is proven too, so no
    byte is handed on before it was checked and the copy is read and hashed once.
    """
    expected = [digests[i:i + 32] for i in range(0, len(digests), 32)]
    pending: list[bytes] = []
    sha, fill, index = hashlib.sha256(), 0, 0

    def check() -> None:
        if index >= len(expected) or sha.digest() != expected[index]:
            raise IntegrityError(f"{where}: block {index} (bytes from {index * size}) does not match "
                                 "the catalog's checksum")

    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            take = min(len(view), size - fill)
            part = view[:take]
            sha.update(part)
            pending.append(chunk if take == len(chunk) else bytes(part))
            fill += take
            view = view[take:]
            if fill == size:
                check()
                yield from pending
                pending.clear()
                sha, fill, index = hashlib.sha256(), 0, index + 1
    if fill:
        check()
        yield from pending
        index += 1
    if index != len(expected):
        raise IntegrityError(f"{where} is truncated: {index} of {len(expected)} blocks")


class Rechunker:
    """Coalesce small writes (Docker frames are ~32 KiB) into CHUNK-sized ones."""

    def __init__(self, downstream: Writer, size: int = CHUNK) -> None:
        self.downstream = downstream
        self.size = size
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        if not self._buf and len(data) >= self.size:
            self.downstream.write(data)  # already large (pipe reads): no copy
            return
        self._buf += data
        if len(self._buf) >= self.size:
            self.downstream.write(bytes(self._buf))
            self._buf.clear()

    def close(self) -> None:
        if self._buf:
            self.downstream.write(bytes(self._buf))
            self._buf.clear()
        self.downstream.close()


class Output(Protocol):
    """One destination's in-progress upload: see backupd.storage.base.Upload."""

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


@dataclass
class FanOutResult:
    size: int
    sha256: str
    errors: dict[str, str]  # output name -> why that copy failed
    blocks: bytes = b""  # BlockDigests of the stored bytes


class FanOut:
    """Hash the stored bytes once and write them to every output.

    One output failing does not stop the others: its upload is aborted and
    the reason kept, so the run can be recorded as partial with the truth.
    """

    def __init__(self, outputs: dict[str, Output]) -> None:
        self.outputs = dict(outputs)
        self.digest = Digest()
        self.blocks = BlockDigests()
        self.errors: dict[str, str] = {}
        self.closed = False

    def _fail(self, name: str, exc: BaseException) -> None:
        self.errors[name] = str(exc) or type(exc).__name__
        log.warning("copy to %s failed: %s", name, self.errors[name], extra={"destination": name})
        output = self.outputs.pop(name)
        try:
            output.abort()
        except Exception as abort_exc:  # noqa: BLE001 - cleanup must not mask the cause
            log.warning("aborting upload to %s failed too: %s", name, abort_exc)

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.blocks.update(data)
        for name, output in list(self.outputs.items()):
            try:
                output.write(data)
            except Exception as exc:  # noqa: BLE001 - isolate one destination
                self._fail(name, exc)
        if not self.outputs:
            raise AllOutputsFailed(self.errors)

    def close(self) -> None:
        """Commit every surviving output: the point where copies become visible."""
        self.closed = True
        for name, output in list(self.outputs.items()):
            try:
                output.commit()
            except Exception as exc:  # noqa: BLE001
                self._fail(name, exc)

    def abort(self, reason: str) -> None:
        """The source failed: no copy may appear under its final name."""
        for name in list(self.outputs):
            self._fail(name, RuntimeError(reason))

    def result(self) -> FanOutResult:
        return FanOutResult(self.digest.size, self.digest.sha256, dict(self.errors), self.blocks.digests())


class AllOutputsFailed(Exception):
    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class ThreadedSink:
    """Run the downstream writer (hashing, destination writes) in its own thread.

    Compression and the stored-bytes work then overlap instead of taking turns;
    a bounded queue keeps memory at a few chunks. An error in the thread is
    raised in the writer's thread at the next write or at close.
    """

    _DONE = object()

    def __init__(self, downstream: Writer, depth: int = 2) -> None:
        self.downstream = downstream
        self.error: BaseException | None = None
        self._queue: "queue.Queue[object]" = queue.Queue(maxsize=depth)
        self._discard = False
        self._thread = threading.Thread(target=self._run, name="stored-bytes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not self._DONE:
            if self.error is None and not self._discard:
                try:
                    self.downstream.write(item)  # type: ignore[arg-type]
                except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def write(self, data: bytes) -> None:
        self._raise()
        with held():
            self._queue.put(data)

    def stop(self, discard: bool = False) -> None:
        """Finish the thread. Pending chunks are written, unless `discard` (the stream is being
        abandoned) or an error came first: then they are dropped."""
        self._discard = self._discard or discard
        if self._thread.is_alive():
            with held():
                self._queue.put(self._DONE)
                self._thread.join()

    def close(self) -> None:
        self.stop()
        self._raise()
        self.downstream.close()


def prefetched(chunks: Iterable[bytes], depth: int = 4) -> Iterator[bytes]:
    """Produce chunks in a thread while the caller works on the previous ones.

    The reading side of ThreadedSink: a restore reads and hashes the copy while
    it decompresses and unpacks what came before. Errors (a checksum mismatch at
    the end included) are raised in the caller, in order.
    """
    items: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()
    failure: list[BaseException] = []

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(chunks)
        try:
            for chunk in source:
                if not put(chunk):
                    break
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            failure.append(exc)
        finally:
            if stop.is_set():
                getattr(source, "close", lambda: None)()  # abandoned: release the copy now
            put(end)

    threading.Thread(target=produce, name="prefetch", daemon=True).start()
    try:
        while True:
            with held():
                item = items.get()
            if item is end:
                break
            yield item  # type: ignore[misc]
        if failure:
            raise failure[0]
    finally:
        stop.set()


def build_pipeline(
    sink: Writer,
    algorithm: str,
    level: int,
    threads: int = 0,
    encrypt: Callable[[Writer], Writer] | None = None,
) -> Writer:
    """tar bytes -> rechunk -> compress -> [encrypt] -> sink (a FanOut, usually behind a ThreadedSink)."""
    stored: Writer = encrypt(sink) if encrypt else sink
    return Rechunker(Compressor(stored, algorithm, level, threads))


def read_chunks(fileobj: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """Iterate a binary file object in chunks."""
    while True:
        chunk = fileobj.read(size)
        if not chunk:
            return
        yield chunk


class Progress:
    """Bytes and rate on a terminal; silent when stderr is not a TTY."""

    def __init__(self, label: str, stream: object | None = None) -> None:
        import sys
        import time

        self._time = time.monotonic
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self.start = self._time()
        self.last = 0.0
        self.total = 0

    def update(self, n: int) -> None:
        self.total += n
        now = self._time()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self._render(now)

    def _render(self, now: float) -> None:
        rate = self.total / max(now - self.start, 1e-6)
        self.stream.write(f"\r{self.label}: {human_bytes(self.total)} at {human_bytes(rate)}/s   ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._render(self._time())
            self.stream.write("\n")
            self.stream.flush()


def human_bytes(n: float) -> str:
    """'512 B', '1.5 KiB', ... '3.0 TiB' (the largest unit); called once per row of `backupd list`."""
    # One comparison and one division per call: dividing by 1024 k times is dividing by 1024**k
    # exactly (powers of two), so this prints what repeated division did.
    size = abs(n)
    if size < 1 << 10:
        return f"{n:.0f} B"
    if size < 1 << 20:
        return f"{n / (1 << 10):.1f} KiB"
    if size < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    if size < 1 << 40:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 40):.1f} TiB"


class IterReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks (for tarfile)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        """Make the next non-empty chunk current; False at the end (an empty chunk is no end)."""
        while not self._buf:
            chunk = next(self._it, None)
            if chunk is None:
                return False
            self._buf = chunk
        return True

    def read(self, size: int = -1) -> bytes:
        """The next chunk as it is when it fits: no copy (zstd's read_to_iter reads this way)."""
        if size < 0:
            return super().read(size)
        if not self._next_chunk():
            return b""
        if len(self._buf) > size:
            return super().read(size)
        chunk, self._buf = self._buf, b""
        return chunk if isinstance(chunk, bytes) else bytes(chunk)

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        if not self._next_chunk():
            return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def drain(self) -> None:
        """Consume the rest, so checks that run at the end of the iterator run."""
        for _ in self._it:
            pass
