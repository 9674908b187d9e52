"""S3 store behaviour against moto: multipart streaming, abort, retries, error text."""

from __future__ import annotations

import os

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
    assert len(up.parts) == 2 and len(up.buffer) < st.part_size  # bounded: at most one part buffered
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
