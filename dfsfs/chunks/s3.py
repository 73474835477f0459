"""Chunks as objects in an S3-compatible bucket: ``<prefix>/<namespace>/<hex>``.

An object is durable once put_object has returned, so `sync()` has nothing to do.
Any S3 implementation works (SeaweedFS, MinIO, Ceph RGW, AWS S3): path-style addressing
and no optional request checksums, which some of them do not implement.
"""

import contextlib
import re
from collections.abc import Iterator

import boto3
import botocore.exceptions
from botocore.config import Config

from dfsfs.chunks.base import (
    ChunkMissingError,
    ChunkStore,
    check_key,
    check_namespace,
    missing_message,
)
from dfsfs.errors import StorageError

# Fail in seconds rather than hang the file system when the endpoint is away; the read
# timeout bounds the wait for each response byte, not a whole transfer.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 15
MAX_ATTEMPTS = 3
# Connections kept per store: as many as chunk transfers the file system runs at once.
MAX_POOL_CONNECTIONS = 16
LIST_PAGE_SIZE = 1000  # the most S3 returns per listing request

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
)
_OBJECT_NAME = re.compile(r"(0|[1-9][0-9]*)/([0-9a-f]{64})")


class S3ChunkStore(ChunkStore):
    """A chunk store in an S3 bucket; boto3 clients are safe to share between threads."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        access_key: str | None,
        secret_key: str | None,
        region: str = "us-east-1",
        name: str = "s3",
        create_bucket: bool = False,
    ) -> None:
        """Connect and check that the bucket exists, creating it if `create_bucket`.

        A None endpoint means AWS itself; None credentials mean boto3's own lookup
        (environment, ~/.aws, instance profile).
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.name = name
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                max_pool_connections=MAX_POOL_CONNECTIONS,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._check_bucket(create_bucket)

    def put(self, namespace: int, digest: bytes, data: bytes) -> None:
        key = self._key(namespace, digest)
        with self._errors("writing", key):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, namespace: int, digest: bytes) -> bytes:
        key = self._key(namespace, digest)
        try:
            with self._errors("reading", key):
                return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except _ObjectMissing:
            raise ChunkMissingError(missing_message(self.name, namespace, digest)) from None

    def has(self, namespace: int, digest: bytes) -> bool:
        key = self._key(namespace, digest)
        try:
            with self._errors("looking up", key):
                self._client.head_object(Bucket=self.bucket, Key=key)
        except _ObjectMissing:
            return False
        return True

    def delete(self, namespace: int, digest: bytes) -> None:
        key = self._key(namespace, digest)
        with self._errors("deleting", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def keys(self, namespace: int | None = None) -> Iterator[tuple[int, bytes]]:
        if namespace is not None:
            check_namespace(namespace)
        listed_prefix = self._key_prefix() + ("" if namespace is None else f"{namespace}/")
        with self._errors("listing", listed_prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=listed_prefix,
                PaginationConfig={"PageSize": LIST_PAGE_SIZE},
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    key = _parse_object_name(entry["Key"][len(self._key_prefix()) :])
                    if key is not None:
                        yield key

    def close(self) -> None:
        self._client.close()

    def _key_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _key(self, namespace: int, digest: bytes) -> str:
        check_key(namespace, digest)
        return f"{self._key_prefix()}{namespace}/{digest.hex()}"

    def _check_bucket(self, create: bool) -> None:
        try:
            with self._errors("checking", ""):
                self._client.head_bucket(Bucket=self.bucket)
        except _ObjectMissing:
            if not create:
                raise StorageError(
                    f"{self.name}: bucket {self.bucket!r} does not exist at {self._where()}"
                ) from None
            with self._errors("creating", ""):
                self._client.create_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3's exceptions into StorageError, or _ObjectMissing for a 404."""
        what = f"{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in _MISSING_CODES:
                raise _ObjectMissing() from None
            raise StorageError(
                f"{self.name}: {action} {what} at {self._where()} failed: "
                f"{error.get('Code', '?')} {error.get('Message', '')}".rstrip()
            ) from exc
        except _UNREACHABLE as exc:
            raise StorageError(
                f"{self.name}: cannot reach the S3 endpoint {self._where()} ({action} {what})"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(
                f"{self.name}: {action} {what} at {self._where()} failed: {exc}"
            ) from exc

    def _where(self) -> str:
        return self.endpoint_url or "AWS S3"


class _ObjectMissing(Exception):
    """An S3 404; each caller decides what absence means for it."""


def _parse_object_name(name: str) -> tuple[int, bytes] | None:
    """(namespace, digest) from ``<namespace>/<hex>``; None for objects not ours."""
    match = _OBJECT_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match[1]), bytes.fromhex(match[2])
