"""S3 store behaviour against moto: multipart streaming, abort, retries, error text."""

from __future__ import annotations

import os
import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from moto import mock_aws

from backupd.config import S3Destination
from backupd.errors import BackupdError, NotFoundError
from backupd.retry import retry
from backupd.storage.s3 import S3Store, is_transient

SECRET = "very-secret-key-123"


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="AK", aws_secret_access_key=SECRET)
        client.create_bucket(Bucket="bucket")
        yield client


def store(client, **extra) -> S3Store:
    spec = S3Destination(type="s3", bucket="bucket", prefix="pre", part_size_mb=5,
                         secret_access_key=SECRET, **extra)
    return S3Store("offsite", spec, client=client)


def test_multipart_upload_streams_parts_and_appears_only_on_commit(s3):
    st = store(s3)
    up = st.open_upload("j/b/volume-x.tar.zst")
    data = os.urandom(12 * 1024 * 1024)
    for i in range(0, len(data), 1 << 20):
        up.write(data[i:i + (1 << 20)])
    assert up.sent == 2 and up.filled < st.part_size  # two parts handed over, the third filling
    assert st.stat("j/b/volume-x.tar.zst") is None
    up.commit()
    assert st.stat("j/b/volume-x.tar.zst").size == len(data)
    with st.open_read("j/b/volume-x.tar.zst") as body:
        assert body.read() == data
    assert [o.key for o in st.list("j/")] == ["j/b/volume-x.tar.zst"]
    assert s3.list_objects_v2(Bucket="bucket")["Contents"][0]["Key"] == "pre/j/b/volume-x.tar.zst"


def test_small_object_is_a_single_put(s3):
    st = store(s3, storage_class="STANDARD_IA")
    up = st.open_upload("j/b/manifest.json")
    up.write(b"{}")
    up.commit()
    head = s3.head_object(Bucket="bucket", Key="pre/j/b/manifest.json")
    assert head["ContentLength"] == 2 and head["StorageClass"] == "STANDARD_IA"


def test_abort_leaves_no_object_and_no_parts(s3):
    st = store(s3)
    up = st.open_upload("j/b/x")
    up.write(os.urandom(6 * 1024 * 1024))
    assert up.upload_id is not None
    up.abort()
    assert st.stat("j/b/x") is None
    assert s3.list_multipart_uploads(Bucket="bucket").get("Uploads", []) == []


def test_missing_bucket_is_permanent_and_named_without_secret(s3):
    st = S3Store("offsite", S3Destination(type="s3", bucket="nope", secret_access_key=SECRET), client=s3)
    up = st.open_upload("k")
    up.write(b"x")
    with pytest.raises(BackupdError) as info:
        up.commit()
    msg = str(info.value)
    assert "destination 'offsite'" in msg and "NoSuchBucket" in msg and "does not exist" in msg
    assert SECRET not in msg


def test_missing_object_is_not_found(s3):
    with pytest.raises(NotFoundError, match="'gone' does not exist"):
        store(s3).open_read("gone")


def test_delete_is_idempotent(s3):
    st = store(s3)
    st.delete("never/was")


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("exc,transient", [
    (client_error("SlowDown", 503), True),
    (client_error("InternalError", 500), True),
    (client_error("Throttling", 400), True),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionResetError(), True),
    (client_error("AccessDenied", 403), False),
    (client_error("NoSuchBucket", 404), False),
    (client_error("InvalidAccessKeyId", 403), False),
])
def test_error_classification(exc, transient):
    assert is_transient(exc) is transient


def test_retry_retries_transient_then_succeeds_and_is_bounded():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    assert retry(flaky, is_transient=is_transient, what="t", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.4

    def always():
        calls.append(1)
        raise client_error("SlowDown", 503)

    calls.clear()
    with pytest.raises(ClientError):
        retry(always, is_transient=is_transient, what="t", attempts=4, sleep=lambda s: None)
    assert len(calls) == 4


def test_permanent_error_is_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        retry(denied, is_transient=is_transient, what="t", sleep=lambda s: None)
    assert calls == [1]


class Failing:
    """A client whose named calls fail with the given errors first, then reach moto."""

    def __init__(self, real, **failures):
        self.real, self.failures, self.calls = real, {k: list(v) for k, v in failures.items()}, []

    def __getattr__(self, name):
        target = getattr(self.real, name)

        def call(**kwargs):
            self.calls.append(name)
            if self.failures.get(name):
                raise self.failures[name].pop(0)
            return target(**kwargs)

        return call


@pytest.fixture
def no_sleep(monkeypatch):
    import functools

    import backupd.storage.s3 as s3mod

    monkeypatch.setattr(s3mod, "retry", functools.partial(retry, sleep=lambda s: None))


def test_a_throttled_part_is_retried_and_the_upload_completes(s3, no_sleep):
    client = Failing(s3, upload_part=[client_error("SlowDown", 503), client_error("InternalError", 500)])
    st = store(client)
    up = st.open_upload("j/b/x")
    data = os.urandom(11 * 1024 * 1024)
    up.write(data)
    up.commit()
    assert client.calls.count("upload_part") == 5  # 3 parts (5+5+1 MiB) + 2 retries
    assert s3.get_object(Bucket="bucket", Key="pre/j/b/x")["Body"].read() == data


def test_permanent_part_failure_fails_fast_and_abort_leaves_nothing(s3, no_sleep):
    client = Failing(s3, upload_part=[client_error("AccessDenied", 403)])
    st = store(client, concurrency=1)  # one part at a time: the next part waits, and sees the failure
    up = st.open_upload("j/b/x")
    with pytest.raises(BackupdError, match="destination 'offsite'.*AccessDenied: access denied") as info:
        up.write(os.urandom(6 * 1024 * 1024))
    assert client.calls.count("upload_part") == 1 and SECRET not in str(info.value)
    up.abort()
    assert st.stat("j/b/x") is None
    assert s3.list_multipart_uploads(Bucket="bucket").get("Uploads", []) == []


def test_access_denied_on_read_is_not_mistaken_for_a_missing_object(s3, no_sleep):
    # Backup ids carry dates such as 20260404: "404" in the key must not mean "missing".
    client = Failing(s3, get_object=[client_error("AccessDenied", 403)])
    with pytest.raises(BackupdError) as info:
        store(client).open_read("j/20260404T000000Z-abc/volume-x.tar.zst")
    assert not isinstance(info.value, NotFoundError) and "AccessDenied" in str(info.value)


def test_unreachable_endpoint_on_stat_is_a_named_error_after_bounded_retries(s3, no_sleep):
    client = Failing(s3, head_object=[EndpointConnectionError(endpoint_url="http://x")] * 10)
    with pytest.raises(BackupdError, match="destination 'offsite'.*stat j/b/x"):
        store(client).stat("j/b/x")
    assert client.calls.count("head_object") == 5


def test_missing_object_stat_is_none(s3):
    assert store(s3).stat("j/b/none") is None


def test_part_size_stays_as_configured_for_ordinary_artifacts_and_grows_for_huge_ones():
    from backupd.storage.s3 import MAX_PART_SIZE, part_size_for

    mb = 1024 * 1024
    assert part_size_for(1, 5 * mb) == part_size_for(5000, 5 * mb) == 5 * mb
    assert part_size_for(5001, 5 * mb) == 10 * mb and part_size_for(5501, 5 * mb) == 20 * mb
    assert part_size_for(10000, 5 * mb) == MAX_PART_SIZE
    for base in (5, 8, 16, 64):  # 10,000 parts reach S3's object size limit (4.9 TiB from 5 MiB parts)
        assert sum(part_size_for(n, base * mb) for n in range(1, 10001)) > 4.8 * 1024**4
    assert part_size_for(10000, 5120 * mb) == MAX_PART_SIZE


def test_storage_class_and_server_side_encryption_reach_the_multipart_upload(s3):
    st = store(s3, storage_class="STANDARD_IA", server_side_encryption="AES256")
    up = st.open_upload("j/b/big")
    up.write(os.urandom(6 * 1024 * 1024))
    up.commit()
    head = s3.head_object(Bucket="bucket", Key="pre/j/b/big")
    assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"


class BreakingBody:
    """A response body that fails once after `after` bytes, like a reset connection."""

    def __init__(self, body, after: int):
        self.body, self.after, self.sent = body, after, 0

    def read(self, n):
        if self.after is not None and self.sent >= self.after:
            self.after = None
            raise ConnectionResetError("connection reset by peer")
        data = self.body.read(min(n, self.after - self.sent) if self.after is not None else n)
        self.sent += len(data)
        return data

    def close(self):
        self.body.close()


def test_a_read_broken_midway_resumes_where_it_stopped(s3):
    data = os.urandom(3 * 1024 * 1024 + 5)
    s3.put_object(Bucket="bucket", Key="pre/j/b/x", Body=data)

    class Client(Failing):
        def __getattr__(self, name):
            if name != "get_object":
                return super().__getattr__(name)

            def get_object(**kwargs):
                self.calls.append(kwargs.get("Range"))
                resp = self.real.get_object(**kwargs)
                if len(self.calls) == 1:
                    resp["Body"] = BreakingBody(resp["Body"], after=1024 * 1024 + 7)
                return resp
            return get_object

    client = Client(s3)
    with store(client).open_read("j/b/x") as f:
        assert f.read() == data
    assert client.calls == [None, f"bytes={1024 * 1024 + 7}-"]


class Slow(Failing):
    """upload_part takes `delay(part number)` seconds; records how many run at once and the
    order calls end in."""

    def __init__(self, real, delay, **failures):
        super().__init__(real, **failures)
        self.delay, self.running, self.most, self.ended = delay, 0, 0, []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        call = super().__getattr__(name)
        if name != "upload_part":
            return call

        def upload_part(**kwargs):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(self.delay(kwargs["PartNumber"]))
                return call(**kwargs)
            finally:
                with self.lock:
                    self.running -= 1
                    self.ended.append(kwargs["PartNumber"])

        return upload_part


def held_at_most(monkeypatch) -> list[int]:
    """The most bytes any upload's budget held, as it happens."""
    from backupd.storage import s3 as s3mod

    most = [0]
    take = s3mod.Budget.take

    def recording(self, n):
        take(self, n)
        most[0] = max(most[0], self.held)

    monkeypatch.setattr(s3mod.Budget, "take", recording)
    return most


def test_parts_are_uploaded_concurrently_within_the_memory_budget(s3, monkeypatch):
    most = held_at_most(monkeypatch)
    client = Slow(s3, delay=lambda n: 0.2)
    st = store(client, concurrency=3)
    up = st.open_upload("j/b/x")
    data = os.urandom(41 * 1024 * 1024)  # 8 full parts and a short one
    for i in range(0, len(data), 1 << 20):
        up.write(data[i:i + (1 << 20)])
    up.commit()
    assert client.most == 3 and up.peak_in_flight == 3
    assert most[0] <= 3 * st.part_size  # parts in flight and the one filling, never more
    assert s3.get_object(Bucket="bucket", Key="pre/j/b/x")["Body"].read() == data


def test_parts_landing_out_of_order_make_the_same_object(s3):
    client = Slow(s3, delay=lambda n: 0.4 if n == 1 else 0.0)  # part 1 lands last
    up = store(client, concurrency=4).open_upload("j/b/x")
    data = os.urandom(16 * 1024 * 1024)
    up.write(data)
    up.commit()
    assert client.ended[-1] == 1 and len(client.ended) == 4
    assert s3.get_object(Bucket="bucket", Key="pre/j/b/x")["Body"].read() == data


class FailPart:
    """A client whose upload_part of one part number is denied; everything else reaches moto."""

    def __init__(self, real, number: int):
        self.real, self.number = real, number

    def __getattr__(self, name):
        if name != "upload_part":
            return getattr(self.real, name)

        def upload_part(**kwargs):
            if kwargs["PartNumber"] == self.number:
                raise client_error("AccessDenied", 403)
            return self.real.upload_part(**kwargs)
        return upload_part


def test_a_part_failing_while_others_fly_fails_the_commit_and_abort_waits_for_them(s3):
    client = Slow(FailPart(s3, 2), delay=lambda n: 0.0 if n == 2 else 0.3)
    up = store(client, concurrency=4).open_upload("j/b/x")
    with pytest.raises(BackupdError, match="upload part 2 of .*AccessDenied"):  # at a write or the commit
        for _ in range(16):
            up.write(os.urandom(1024 * 1024))
        up.commit()
    up.abort()
    assert client.running == 0  # abort returned only after every part in flight had ended
    assert s3.list_multipart_uploads(Bucket="bucket").get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket="bucket").get("Contents", []) == []


def test_the_buffers_of_parts_that_landed_are_filled_again(s3):
    """Memory stays flat: no more part buffers than parts in flight, however many parts."""
    bodies = set()

    class Recording(Failing):
        def __getattr__(self, name):
            call = super().__getattr__(name)
            if name != "upload_part":
                return call

            def upload_part(**kwargs):
                bodies.add(id(kwargs["Body"]))
                return call(**kwargs)
            return upload_part

    up = store(Recording(s3), concurrency=2).open_upload("j/b/x")
    data = os.urandom(41 * 1024 * 1024)  # 8 full parts and a short one
    for i in range(0, len(data), 1 << 20):
        up.write(data[i:i + (1 << 20)])
    up.commit()
    assert up.sent == 9 and len(bodies) <= 3  # two buffers in turn, and the short last part
    assert s3.get_object(Bucket="bucket", Key="pre/j/b/x")["Body"].read() == data
