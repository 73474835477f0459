import os
import socket
import uuid

import boto3
import pytest

from dfsfs.chunks import ChunkMissingError, LocalChunkStore, S3ChunkStore, digest_of, open_store
from dfsfs.errors import ConfigError, InvalidKeyError, StorageError

from test_chunks_local import check_roundtrip  # the same contract, shared

pytest_plugins = ["seaweed"]


def unique_bucket():
    return f"dfsfs-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(seaweed_s3):
    store = seaweed_s3.chunk_store()
    yield store
    store.close()


def test_put_get_has_delete_keys_roundtrip(store):
    check_roundtrip(store, os.urandom(100_000))


def test_missing_chunk_raises_chunk_missing(store):
    with pytest.raises(ChunkMissingError):
        store.get(1, digest_of(b"never stored"))


def test_objects_are_named_prefix_namespace_hex(seaweed_s3, store):
    digest = digest_of(b"named")
    store.put(12, digest, b"named")
    client = raw_client(seaweed_s3)
    listed = client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)["Contents"]
    assert [entry["Key"] for entry in listed] == [f"{store.prefix}/12/{digest.hex()}"]


def test_keys_ignore_foreign_objects(seaweed_s3, store):
    digest = digest_of(b"ours")
    store.put(1, digest, b"ours")
    client = raw_client(seaweed_s3)
    foreign = ["readme.txt", f"1/{digest.hex()}.part", "01/" + "a" * 64, "1/" + "B" * 64,
               "1/x/" + "c" * 64]
    for name in foreign:
        client.put_object(Bucket=store.bucket, Key=f"{store.prefix}/{name}", Body=b"x")
    client.put_object(Bucket=store.bucket, Key=f"{store.prefix}-other/1/{'d' * 64}", Body=b"x")
    assert list(store.keys()) == [(1, digest)]


def test_keys_paginate_past_one_listing_page(store, monkeypatch):
    monkeypatch.setattr("dfsfs.chunks.s3.LIST_PAGE_SIZE", 2)
    chunks = [str(index).encode() for index in range(5)]
    for data in chunks:
        store.put(2, digest_of(data), data)
    assert sorted(store.keys(2)) == sorted((2, digest_of(data)) for data in chunks)


def test_empty_prefix_puts_namespaces_at_the_top(seaweed_s3):
    store = seaweed_s3.chunk_store(bucket=unique_bucket(), prefix="")
    digest = digest_of(b"top")
    store.put(1, digest, b"top")
    listed = raw_client(seaweed_s3).list_objects_v2(Bucket=store.bucket)["Contents"]
    assert [entry["Key"] for entry in listed] == [f"1/{digest.hex()}"]
    assert list(store.keys()) == [(1, digest)]


def test_invalid_keys_are_refused(store):
    with pytest.raises(InvalidKeyError):
        store.put(1, b"../../etc/passwd", b"x")
    with pytest.raises(InvalidKeyError):
        store.get("../1", digest_of(b"x"))


def test_missing_bucket_is_an_error_unless_created(seaweed_s3):
    bucket = unique_bucket()
    with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist"):
        seaweed_s3.chunk_store(bucket=bucket, create_bucket=False)
    seaweed_s3.chunk_store(bucket=bucket, create_bucket=True)
    seaweed_s3.chunk_store(bucket=bucket, create_bucket=False)  # now it exists
    seaweed_s3.chunk_store(bucket=bucket, create_bucket=True)  # creating again is harmless


def test_wrong_credentials_are_a_storage_error(seaweed_s3, store):
    with pytest.raises(StorageError, match="InvalidAccessKeyId|403"):
        seaweed_s3.chunk_store(access_key="nobody", secret_key="wrong")


def test_unreachable_endpoint_is_a_storage_error_naming_it(unused_port):
    endpoint = f"http://127.0.0.1:{unused_port}"
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}"):
        S3ChunkStore("bucket", "p", endpoint, "key", "secret")


@pytest.fixture
def unused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_client(server):
    return boto3.client(
        "s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
    )


# open_store


def test_open_store_file_url_and_bare_path(tmp_path):
    for url in (f"file://{tmp_path}/a", str(tmp_path / "b"), f"file://localhost{tmp_path}/c"):
        store = open_store(url, "primary")
        assert isinstance(store, LocalChunkStore)
        assert store.name == "primary"
    assert open_store(f"file://{tmp_path}/with%20space", "p").root == str(tmp_path / "with space")


def test_open_store_s3_url_with_credentials_in_query(seaweed_s3):
    bucket = seaweed_s3.bucket
    url = (f"s3://{bucket}/some/prefix/?endpoint={seaweed_s3.endpoint_url}&region=us-east-1"
           f"&access_key={seaweed_s3.access_key}&secret_key={seaweed_s3.secret_key}")
    store = open_store(url, "backup", create_bucket=True)
    assert isinstance(store, S3ChunkStore)
    assert (store.bucket, store.prefix, store.name) == (bucket, "some/prefix", "backup")
    store.put(1, digest_of(b"via url"), b"via url")
    assert store.get(1, digest_of(b"via url")) == b"via url"


def test_open_store_s3_url_with_credentials_from_environment(seaweed_s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    store = open_store(f"s3://{seaweed_s3.bucket}/env?endpoint={seaweed_s3.endpoint_url}", "backup")
    assert store.prefix == "env"
    assert list(store.keys()) == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://host/path", "unknown scheme 'ftp'"),
        ("relative/path", "not a URL or absolute path"),
        ("", "not a URL or absolute path"),
        ("file://otherhost/path", "no host"),
        ("file:relative", "must be absolute"),
        ("file:///path?x=1", "no host, query or fragment"),
        ("s3:///prefix?endpoint=http://h:1", "must be a bucket name"),
        ("s3://bucket:9000/prefix", "must be a bucket name"),
        ("s3://bucket?endpoint=ftp://h:1", "endpoint must be http"),
        ("s3://bucket?endpoint=127.0.0.1:8333", "endpoint must be http"),
        ("s3://bucket?endpont=http://h:1", "unknown parameter"),
        ("s3://bucket?endpoint=http://h:1&endpoint=http://h:2", "given once"),
        ("s3://bucket?region=", "given once, with a value"),
        ("s3://bucket?access_key=AKIA", "go together"),
        ("s3://bucket?endpoint=http://[::1", "malformed endpoint"),
    ],
)
def test_open_store_refuses_bad_urls_naming_the_accepted_forms(url, reason):
    with pytest.raises(ConfigError, match=reason) as refused:
        open_store(url, "primary")
    assert "accepted forms: file:///absolute/path" in str(refused.value)


def test_open_store_errors_never_show_credentials():
    with pytest.raises(ConfigError) as refused:
        open_store("s3://AKID:SECRET1@bucket?access_key=AKID2&secret_key=SECRET2&bogus=1", "backup")
    message = str(refused.value)
    assert "bogus" in message
    for credential in ("AKID", "SECRET1", "AKID2", "SECRET2"):
        assert credential not in message
