"""S3 and S3-compatible destination (boto3).

Uploads stream as a multipart upload with several parts in flight at once;
memory is bounded by `concurrency` x the part size whatever the artifact
size. The object appears under its final key only when the upload is
completed; abort() aborts the multipart upload so no object and no orphaned
parts remain.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Iterator

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as Urllib3Error

from backupd.config import S3Destination
from backupd.errors import BackupdError, NotFoundError
from backupd.retry import ATTEMPTS, retry
from backupd.storage.base import REPOSITORY_ROOT, ChunkReader, Leftover, ObjectInfo, Store, Upload, check_key
from backupd.stream import CHUNK

log = logging.getLogger(__name__)

TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling",
                   "ThrottlingException", "InternalError", "ServiceUnavailable", "503", "500"}
MISSING_CODES = {"NoSuchKey", "NotFound", "404"}  # the object; a missing bucket is NoSuchBucket
MAX_PARTS = 10_000  # S3's limit per multipart upload
MAX_PART_SIZE = 5 * 1024**3
PERMANENT_HINTS = {
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key is wrong",
    "AccessDenied": "access denied: check the credentials' permissions",
    "NoSuchBucket": "the bucket does not exist",
}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, (BotoConnectionError, BotoCoreError, ConnectionError, TimeoutError))


def _code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def part_size_for(number: int, base: int) -> int:
    """Size of part `number` (1-based): the configured size for the first 5000 parts,
    then doubling every 500, so one upload reaches S3's 5 TB object limit within its
    10,000 parts even from the smallest part size, while ordinary artifacts keep the
    memory bound they were given. (The uploader's budget stays concurrency x the
    configured size: larger parts go fewer at a time.)"""
    return min(MAX_PART_SIZE, base * 2 ** max(0, (number - 1) // 500 - 9))


class S3Store(Store):
    def __init__(self, name: str, spec: S3Destination, client: Any = None) -> None:
        super().__init__(name)
        self.spec = spec
        self.bucket = spec.bucket
        self.prefix = spec.prefix.strip("/") + "/" if spec.prefix.strip("/") else ""
        self.part_size = spec.part_size_mb * 1024 * 1024
        self.concurrency = spec.concurrency
        self.client = client or boto3.client(
            "s3",
            endpoint_url=spec.endpoint_url,
            region_name=spec.region,
            aws_access_key_id=spec.access_key_id,
            aws_secret_access_key=spec.secret_access_key.get_secret_value() if spec.secret_access_key else None,
            config=BotoConfig(retries={"mode": "standard", "max_attempts": 3},
                              connect_timeout=10, read_timeout=120,
                              max_pool_connections=max(10, spec.concurrency + 2)),
        )

    def describe(self) -> str:
        where = f" at {self.spec.endpoint_url}" if self.spec.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def error(self, action: str, key: str, exc: BaseException) -> BackupdError:
        """One line naming destination, action and cause; never credentials."""
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            hint = PERMANENT_HINTS.get(code, exc.response.get("Error", {}).get("Message", ""))
            return BackupdError(f"destination '{self.name}' ({self.describe()}): {action} {key}: {code}: {hint}")
        return BackupdError(f"destination '{self.name}' ({self.describe()}): {action} {key}: {exc}")

    def _call(self, action: str, key: str, fn: Any, **kwargs: Any) -> Any:
        """fn(**kwargs) with retries; a missing object is NotFoundError, anything else a
        BackupdError naming the destination (decided from the S3 error code, not its text)."""
        try:
            return retry(lambda: fn(**kwargs), is_transient=is_transient,
                         what=f"{self.name}: {action} {key}")
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                raise NotFoundError(f"destination '{self.name}' ({self.describe()}): "
                                    f"'{key}' does not exist") from None
            raise self.error(action, key, exc) from None
        except (BotoCoreError, OSError) as exc:
            raise self.error(action, key, exc) from None

    def open_upload(self, key: str) -> Upload:
        return S3Upload(self, self._key(key))

    def open_read(self, key: str) -> BinaryIO:
        obj = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        current = [obj["Body"]]
        return ChunkReader(self._resuming_chunks(key, obj, current), lambda: current[0].close())  # type: ignore[return-value]

    def _resuming_chunks(self, key: str, obj: dict[str, Any], current: list[Any]) -> Iterator[bytes]:
        """The object's bytes; a connection lost mid-read resumes where it stopped
        (a ranged GET pinned to the same ETag), a bounded number of times."""
        done, failures = 0, 0
        while True:
            try:
                chunk = current[0].read(CHUNK)
            except (BotoCoreError, Urllib3Error, OSError) as exc:
                failures += 1
                if failures >= ATTEMPTS:
                    raise self.error("read", key, exc) from None
                log.warning("%s: reading %s broke at byte %d (%s); resuming", self.name, key, done, exc)
                current[0].close()
                current[0] = self._call("resume read of", key, self.client.get_object, Bucket=self.bucket,
                                        Key=self._key(key), Range=f"bytes={done}-", IfMatch=obj["ETag"])["Body"]
                continue
            if not chunk:
                return
            done += len(chunk)
            yield chunk

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], obj.get("LastModified"))
        except (ClientError, BotoCoreError) as exc:
            raise self.error("list", prefix or "/", exc) from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self._call("stat", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return None
        return ObjectInfo(key, head["ContentLength"], head.get("LastModified"))

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def leftovers(self) -> Iterator[Leftover]:
        """Multipart uploads still open under the prefix, for keys of backupd's layout."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    key = upload["Key"][len(self.prefix):]
                    if key.count("/") == 2 and not key.startswith(REPOSITORY_ROOT + "/"):  # <job>/<id>/<file>
                        yield Leftover(key, self._uploaded(upload["Key"], upload["UploadId"]),
                                       upload.get("Initiated"), upload["UploadId"])
        except (ClientError, BotoCoreError) as exc:
            raise self.error("list open uploads under", self.prefix or "/", exc) from None

    def _uploaded(self, key: str, upload_id: str) -> int:
        """Bytes an open multipart upload holds (the sum of its parts)."""
        total = 0
        try:
            for page in self.client.get_paginator("list_parts").paginate(
                    Bucket=self.bucket, Key=key, UploadId=upload_id):
                total += sum(part["Size"] for part in page.get("Parts", []))
        except ClientError as exc:
            if _code(exc) != "NoSuchUpload":  # completed or aborted meanwhile
                raise
        return total

    def remove_leftover(self, leftover: Leftover) -> None:
        """Abort the multipart upload: its parts are freed; an upload already gone is no error."""
        assert leftover.upload_id is not None, "an S3 leftover is an open multipart upload"
        key = self._key(leftover.key)
        try:
            retry(lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                             UploadId=leftover.upload_id),
                  is_transient=is_transient, what=f"{self.name}: abort upload of {leftover.key}")
        except ClientError as exc:
            if _code(exc) in {"NoSuchUpload", *MISSING_CODES}:
                return
            raise self.error("abort upload of", leftover.key, exc) from None
        except (BotoCoreError, OSError) as exc:
            raise self.error("abort upload of", leftover.key, exc) from None

    def extra_args(self) -> dict[str, str]:
        args = {}
        if self.spec.storage_class:
            args["StorageClass"] = self.spec.storage_class
        if self.spec.server_side_encryption:
            args["ServerSideEncryption"] = self.spec.server_side_encryption
        if self.spec.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.spec.sse_kms_key_id
        return args


class S3Upload(Upload):
    """Multipart upload fed by write(): a part is handed to the uploader threads each time
    it is full, and up to `concurrency` parts are uploaded at once.

    Memory is bounded by `concurrency` x `part_size_mb`: the part being filled and the
    parts in flight each hold their bytes against that budget, and filling the next one
    waits for room. The bytes were hashed in order before they got here (backupd.stream),
    so the order the parts land in changes no checksum. A part that fails (after the
    usual retries) fails the next write() or commit(); abort() waits for the parts in
    flight, so none lands after the upload is aborted.
    """

    def __init__(self, store: S3Store, key: str) -> None:
        self.store = store
        self.key = key
        self.buffer = bytearray()  # the part being filled, allocated at its full size
        self.filled = 0  # bytes of it written so far
        self._spare: list[bytearray] = []  # buffers of parts that landed, filled again next
        self.parts: dict[int, str] = {}  # part number -> ETag, as parts complete
        self.upload_id: str | None = None
        self.done = False
        self.sent = 0  # parts handed to the uploader
        self.peak_in_flight = 0  # most parts uploading at once (for tests and benchmarks)
        self._budget = Budget(store.concurrency * store.part_size)
        self._reserved = 0  # bytes the part being filled holds against the budget
        self._uploading = 0
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._aborting = False

    def _start(self) -> None:
        resp = self.store._call("start upload of", self.key, self.store.client.create_multipart_upload,
                                Bucket=self.store.bucket, Key=self.key, **self.store.extra_args())
        self.upload_id = resp["UploadId"]
        self._pool = ThreadPoolExecutor(self.store.concurrency, thread_name_prefix="s3-part")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        self._raise()
        view = memoryview(data)
        while view:
            if not self._reserved:
                self._next_buffer(part_size_for(self.sent + 1, self.store.part_size))
                self._raise()  # a part failed while this one waited for room
            take = min(len(view), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == len(self.buffer):
                self._hand_off()

    def _next_buffer(self, size: int) -> None:
        """Wait for room for a part of `size` bytes; fill a spare buffer, or a new one.
        Reusing the buffers of parts that landed keeps the process's memory flat: fresh
        allocations of several MiB each, freed by other threads, fragment the heap."""
        self._budget.take(size)
        self._reserved = size
        with self._budget.lock:
            self._spare = [b for b in self._spare if len(b) == size]
            self.buffer = self._spare.pop() if self._spare else bytearray(size)
        self.filled = 0

    def _hand_off(self) -> None:
        """Give the full buffer (and its share of the budget) to an uploader thread."""
        if self.upload_id is None:
            self._start()
        number = self.sent + 1
        if number > MAX_PARTS:
            raise BackupdError(f"destination '{self.store.name}': {self.key} needs more than "
                               f"{MAX_PARTS} parts; raise part_size_mb")
        data, reserved = self.buffer, self._reserved
        if self.filled < len(data):  # the last part: shorter
            del data[self.filled:]
        self.buffer, self.filled, self._reserved, self.sent = bytearray(), 0, 0, number
        assert self._pool is not None
        self._pool.submit(self._send_part, number, [data], reserved)

    def _send_part(self, number: int, box: list[bytearray], reserved: int) -> None:
        """Upload one part (in an uploader thread); the first failure is kept for the writer.
        The bytes come in a box emptied here, so they are freed before their room is given back."""
        data = box.pop()
        with self._budget.lock:
            self._uploading += 1
            self.peak_in_flight = max(self.peak_in_flight, self._uploading)
        try:
            if self._error is None and not self._aborting:
                resp = self.store._call(f"upload part {number} of", self.key, self._upload_part,
                                        Number=number, Body=data)
                self.parts[number] = resp["ETag"]
        except BaseException as exc:  # noqa: BLE001 - raised in the writer's thread
            if self._error is None:
                self._error = exc
        finally:
            with self._budget.lock:
                self._uploading -= 1
                if len(data) == reserved and not self._aborting:
                    self._spare.append(data)  # S3 is done with it: the next part fills it
            del data
            self._budget.give(reserved)

    def _upload_part(self, Number: int, Body: bytearray) -> Any:  # noqa: N803 - S3's names
        if self._aborting:
            raise UploadAborted(f"upload of {self.key} aborted")
        return self.store.client.upload_part(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                                             PartNumber=Number, Body=Body)

    def _wait(self) -> None:
        """Until every part handed over has landed or failed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def commit(self) -> None:
        self._raise()
        if self.upload_id is None:  # small object: one PUT, atomic by nature
            self.store._call("upload", self.key, self.store.client.put_object, Bucket=self.store.bucket,
                             Key=self.key, Body=bytes(self.buffer[:self.filled]), **self.store.extra_args())
        else:
            if self.filled:
                self._hand_off()
            self._wait()
            self._raise()
            parts = [{"PartNumber": n, "ETag": self.parts[n]} for n in range(1, self.sent + 1)]
            self.store._call("complete upload of", self.key, self.store.client.complete_multipart_upload,
                             Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                             MultipartUpload={"Parts": parts})
        self.buffer, self.filled, self._spare = bytearray(), 0, []
        self.done = True

    def abort(self) -> None:
        self.buffer, self.filled = bytearray(), 0
        self._aborting = True
        self._wait()  # a part still in flight would otherwise land after the abort, and stay
        self._spare = []
        if self.upload_id is not None and not self.done:
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                         UploadId=self.upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("%s: could not abort upload of %s: %s", self.store.name, self.key,
                            self.store.error("abort", self.key, exc))
        self.done = True


class UploadAborted(Exception):
    """A part not sent because its upload is being aborted (never retried)."""


class Budget:
    """Bytes that may be held at once; take() waits for room (one oversized take is let through
    when nothing else is held, so a part larger than the whole budget still goes, alone)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        self.lock = threading.Lock()
        self._room = threading.Condition(self.lock)

    def take(self, n: int) -> None:
        with self._room:
            while self.held and self.held + n > self.size:
                self._room.wait()
            self.held += n

    def give(self, n: int) -> None:
        with self._room:
            self.held -= n
            self._room.notify_all()
