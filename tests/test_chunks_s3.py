import os
import socket
import uuid

import boto3
import pytest

import time

from dfsfs.chunks import ChunkMissingError, LocalChunkStore, S3ChunkStore, digest_of, open_store
from dfsfs.chunks.s3 import DEFAULT_TIMEOUT_S
from dfsfs.chunks.url import prepare_stores, read_credentials_file, take_environment_credentials
from dfsfs.errors import ConfigError, InvalidKeyError, StorageError, StoreUnavailableError

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


def test_wrong_credentials_are_a_storage_error_naming_the_fix(seaweed_s3, store):
    with pytest.raises(StorageError, match="does not know the access key: check") as refused:
        seaweed_s3.chunk_store(access_key="nobody", secret_key="wrong")
    assert not isinstance(refused.value, StoreUnavailableError)
    with pytest.raises(StorageError, match="secret key does not match the access key"):
        S3ChunkStore(store.bucket, store.prefix, seaweed_s3.endpoint_url,
                     seaweed_s3.access_key, "wrong").put(1, digest_of(b"x"), b"x")


def test_a_lacking_permission_is_named(seaweed_s3, store):
    keys = read_credentials_file(str(seaweed_s3.reader_credentials_file))
    reader = S3ChunkStore(store.bucket, store.prefix, seaweed_s3.endpoint_url,
                          keys.access_key, keys.secret_key, name="primary")
    with pytest.raises(StorageError, match=r"primary: writing .* access denied: the "
                       r"credentials lack s3:PutObject on bucket 'dfsfs-test'"):
        reader.put(1, digest_of(b"x"), b"x")
    with pytest.raises(StorageError, match="lack s3:CreateBucket on bucket"):
        S3ChunkStore(unique_bucket(), "", seaweed_s3.endpoint_url, keys.access_key,
                     keys.secret_key, create_bucket=True)


def test_unreachable_endpoint_is_an_outage_within_the_deadline(unused_port):
    endpoint = f"http://127.0.0.1:{unused_port}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"the S3 server at {endpoint} does not "
                       "answer .* start the S3 server or check endpoint="):
        S3ChunkStore("bucket", "p", endpoint, "key", "secret", timeout_s=2)
    assert time.monotonic() - started <= 2.5


def test_a_stalled_server_is_an_outage_within_the_deadline(seaweed_s3, store):
    """A server that accepts connections and never answers (as a stopped process would)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="does not answer"):
            S3ChunkStore("bucket", "p", endpoint, "key", "secret", timeout_s=3)
        elapsed = time.monotonic() - started
    assert 1 <= elapsed <= 3.5, elapsed


def test_the_default_deadline_is_a_few_seconds():
    assert 2 <= DEFAULT_TIMEOUT_S <= 10


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


def test_open_store_s3_url_with_a_credentials_file(seaweed_s3):
    url = seaweed_s3.url(prefix="some/prefix/", region="us-east-1", timeout=3)
    store = open_store(url, "backup", create_bucket=True)
    assert isinstance(store, S3ChunkStore)
    assert (store.bucket, store.prefix, store.name, store.timeout_s) == (
        seaweed_s3.bucket, "some/prefix", "backup", 3.0)
    store.put(1, digest_of(b"via url"), b"via url")
    assert store.get(1, digest_of(b"via url")) == b"via url"


def test_open_store_s3_url_with_credentials_from_environment(seaweed_s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed_s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    store = open_store(f"s3://{seaweed_s3.bucket}/env?endpoint={seaweed_s3.endpoint_url}", "backup")
    assert store.prefix == "env"
    assert list(store.keys()) == []


def test_credentials_taken_from_the_environment_leave_it(seaweed_s3, monkeypatch):
    """What a forked daemon inherits no longer holds the keys, yet its stores still work."""
    monkeypatch.setattr("dfsfs.chunks.url._taken", None)
    environ = {"AWS_ACCESS_KEY_ID": seaweed_s3.access_key,
               "AWS_SECRET_ACCESS_KEY": seaweed_s3.secret_key, "OTHER": "kept"}
    take_environment_credentials(environ)
    assert environ == {"OTHER": "kept"}
    store = open_store(f"s3://{seaweed_s3.bucket}/taken?endpoint={seaweed_s3.endpoint_url}", "p")
    store.put(1, digest_of(b"taken"), b"taken")


def test_credentials_file_must_be_private_and_complete(tmp_path):
    path = tmp_path / "creds"
    path.write_text("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n")
    path.chmod(0o600)
    assert (read_credentials_file(str(path)).access_key, read_credentials_file(str(path)).secret_key) == ("AK", "SK")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match=f"may be read by other users: run `chmod 600 {path}`"):
        read_credentials_file(str(path))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=r"has no \[other\] section"):
        read_credentials_file(str(path), "other")
    path.write_text("[default]\naws_access_key_id = AK\n")
    with pytest.raises(ConfigError, match="needs aws_access_key_id and aws_secret_access_key"):
        read_credentials_file(str(path))
    with pytest.raises(ConfigError, match="cannot read the S3 credentials file"):
        read_credentials_file(str(tmp_path / "absent"))


def test_prepare_stores_creates_missing_buckets_and_names_a_lacking_permission(seaweed_s3, tmp_path):
    bucket = unique_bucket()
    said = []
    prepare_stores(seaweed_s3.url(bucket=bucket, prefix=""), "primary",
                   f"file://{tmp_path}/backup", "backup", report=said.append)
    assert said == [f"primary store: created bucket {bucket} at {seaweed_s3.endpoint_url}"]
    prepare_stores(seaweed_s3.url(bucket=bucket, prefix=""), "primary", report=said.append)
    assert said[-1] == f"primary store: checked bucket {bucket} at {seaweed_s3.endpoint_url}"
    reader = seaweed_s3.url(bucket=bucket, credentials=seaweed_s3.reader_credentials_file)
    with pytest.raises(StorageError, match=f"primary: writing {bucket}/.*lack s3:PutObject"):
        prepare_stores(reader, "primary", report=said.append)


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
        ("s3://bucket?endpoint=ftp://h:1", "endpoint= must be http"),
        ("s3://bucket?endpoint=127.0.0.1:8333", "endpoint= must be http"),
        ("s3://bucket?endpont=http://h:1", "unknown parameter"),
        ("s3://bucket?endpoint=http://h:1&endpoint=http://h:2", "given once"),
        ("s3://bucket?region=", "given once, with a value"),
        ("s3://bucket?access_key=AKIA", "may not be given in a URL"),
        ("s3://bucket?endpoint=http://[::1", "endpoint= is not a URL"),
        ("s3://bucket?timeout=0", "timeout= must be seconds"),
        ("s3://bucket?credentials=relative", "credentials= must be an absolute path"),
        ("s3://bucket?profile=x", "give both"),
    ],
)
def test_open_store_refuses_bad_urls_naming_the_accepted_forms(url, reason):
    with pytest.raises(ConfigError, match=reason) as refused:
        open_store(url, "primary")
    assert "accepted forms: file:///absolute/path" in str(refused.value)


@pytest.mark.parametrize("url", [
    "s3://AKID:SECRET1@bucket?access_key=AKID2&secret_key=SECRET2&bogus=1",
    "s3://bucket?endpoint=http://h:1&secret=SECRET1",  # a mistyped parameter name
    "s3://bucket?endpoint=http://h:1&SECRET1SECRET1SECRET1SECRET1SECRET1SECRET1=1",
    "s3://bucket?endpoint=http://AKID:SECRET1@h:1",
    "s3://bucket?region=SECRET1%00x",
    "s3://bucket?endpoint=http://h:1&region=us&SECRET1",
])
def test_open_store_errors_never_show_credentials(url):
    with pytest.raises(ConfigError) as refused:
        open_store(url, "backup")
    message = str(refused.value)
    assert "bad chunk store URL 's3://" in message
    for credential in ("AKID", "SECRET1", "AKID2", "SECRET2"):
        assert credential not in message
