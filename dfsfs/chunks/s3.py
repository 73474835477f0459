"""Chunks as objects in an S3-compatible bucket: ``<prefix>/<namespace>/<hex>``.

An object is durable once put_object has returned, so `sync()` has nothing to do.
Any S3 implementation works (SeaweedFS, MinIO, Ceph RGW, AWS S3): path-style addressing
and no optional request checksums, which some of them do not implement.

Every operation, its retries included, ends within one deadline (`timeout_s`, a few
seconds by default): a stalled or absent server yields StoreUnavailableError (EIO) as fast
as a stalled database does, never after minutes. An outage is StoreUnavailableError, a
refusal (credentials, permissions, no bucket) a plain StorageError that names the
permission or setting to fix, and a missing object ChunkMissingError: callers can tell an
outage from damage.
"""

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

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
from dfsfs.errors import StorageError, StoreUnavailableError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 6.0  # one operation, retries included
MAX_CONNECT_TIMEOUT_S = 1.5
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5
# Connections kept per store: as many as chunk transfers the file system runs at once.
MAX_POOL_CONNECTIONS = 16
LIST_PAGE_SIZE = 1000  # the most S3 returns per listing request

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError",
                    "503", "500", "502", "504"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled"}
# What each operation needs, named as in S3 policies, for "access denied" messages.
PERMISSIONS = {
    "writing": "s3:PutObject",
    "reading": "s3:GetObject",
    "looking up": "s3:GetObject",
    "deleting": "s3:DeleteObject",
    "listing": "s3:ListBucket",
    "checking": "s3:ListBucket",
    "creating": "s3:CreateBucket",
}
_UNREACHABLE = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)
_OBJECT_NAME = re.compile(r"(0|[1-9][0-9]*)/([0-9a-f]{64})")
T = TypeVar("T")


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
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session_token: str | None = None,
    ) -> None:
        """Connect and check that the bucket exists, creating it if `create_bucket`.

        A None endpoint means AWS itself; None credentials mean boto3's own lookup
        (~/.aws, instance profile).
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.name = name
        self.timeout_s = timeout_s
        # A stalled server costs one attempt's connect + read timeout, half the deadline.
        connect_timeout = min(MAX_CONNECT_TIMEOUT_S, timeout_s / 4)
        read_timeout = timeout_s / 2 - connect_timeout
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            config=Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"total_max_attempts": 1},  # retried here, within the deadline
                max_pool_connections=MAX_POOL_CONNECTIONS,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.created_bucket = self._check_bucket(create_bucket)

    def put(self, namespace: int, digest: bytes, data: bytes) -> None:
        key = self._key(namespace, digest)
        self._call("writing", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=key, Body=data))

    def get(self, namespace: int, digest: bytes) -> bytes:
        key = self._key(namespace, digest)
        try:
            return self._call("reading", key, lambda: self._client.get_object(
                Bucket=self.bucket, Key=key)["Body"].read())
        except _ObjectMissing:
            raise ChunkMissingError(missing_message(self.name, namespace, digest)) from None

    def has(self, namespace: int, digest: bytes) -> bool:
        key = self._key(namespace, digest)
        try:
            self._call("looking up", key, lambda: self._client.head_object(
                Bucket=self.bucket, Key=key))
        except _ObjectMissing:
            return False
        return True

    def delete(self, namespace: int, digest: bytes) -> None:
        key = self._key(namespace, digest)
        self._call("deleting", key, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=key))

    def keys(self, namespace: int | None = None) -> Iterator[tuple[int, bytes]]:
        if namespace is not None:
            check_namespace(namespace)
        listed_prefix = self._key_prefix() + ("" if namespace is None else f"{namespace}/")
        token = None
        while True:
            arguments = dict(Bucket=self.bucket, Prefix=listed_prefix, MaxKeys=LIST_PAGE_SIZE)
            if token:
                arguments["ContinuationToken"] = token
            page = self._call("listing", listed_prefix,
                              lambda: self._client.list_objects_v2(**arguments))
            for entry in page.get("Contents", ()):
                key = _parse_object_name(entry["Key"][len(self._key_prefix()) :])
                if key is not None:
                    yield key
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def probe(self) -> None:
        """Write, read, list and delete a probe object: StorageError names what is denied."""
        key = f"{self._key_prefix()}.dfsfs-probe"
        self._call("writing", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=key, Body=b"dfsfs"))
        self._call("reading", key, lambda: self._client.get_object(
            Bucket=self.bucket, Key=key)["Body"].read())
        self._call("listing", self._key_prefix(), lambda: self._client.list_objects_v2(
            Bucket=self.bucket, Prefix=self._key_prefix(), MaxKeys=1))
        self._call("deleting", key, lambda: self._client.delete_object(
            Bucket=self.bucket, Key=key))

    def close(self) -> None:
        self._client.close()

    def _key_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _key(self, namespace: int, digest: bytes) -> str:
        check_key(namespace, digest)
        return f"{self._key_prefix()}{namespace}/{digest.hex()}"

    def _check_bucket(self, create: bool) -> bool:
        """Whether the bucket was created now; StorageError if it is missing or denied."""
        try:  # a listing, not HEAD: its error responses say which credential is wrong
            self._call("checking", "", lambda: self._client.list_objects_v2(
                Bucket=self.bucket, Prefix=self._key_prefix(), MaxKeys=1))
        except (_ObjectMissing, _BucketMissing):
            if not create:
                raise StorageError(
                    f"{self.name}: bucket {self.bucket!r} does not exist at {self._where()}: "
                    "run `dfsfs init` (it creates missing buckets)"
                ) from None
            self._call("creating", "", lambda: self._client.create_bucket(Bucket=self.bucket))
            return True
        return False

    def _call(self, action: str, key: str, operation: Callable[[], T]) -> T:
        """Run `operation`, retrying outages until the deadline; errors as dfsfs errors.

        Another attempt starts only while it can end by the deadline if it takes as long
        as the last one: a stalled server gets one or two attempts, a refusing one many.
        """
        started = time.monotonic()
        deadline = started + self.timeout_s
        backoff = FIRST_BACKOFF_S
        attempts = 0
        while True:
            attempts += 1
            attempt_started = time.monotonic()
            try:
                with self._errors(action, key):
                    return operation()
            except StoreUnavailableError as error:
                now = time.monotonic()
                if now + backoff + (now - attempt_started) >= deadline:
                    raise StoreUnavailableError(
                        f"{error}, {attempts} attempt{'s' if attempts > 1 else ''} in "
                        f"{now - started:.1f} s: start the S3 server or check endpoint= in the "
                        "store URL (the store's timeout= is the deadline)"
                    ) from error.__cause__
                log.debug("%s: retrying %s %s: %s", self.name, action, key, error)
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3's exceptions into dfsfs errors, or _ObjectMissing for a 404."""
        what = f"{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        try:
            yield
        except botocore.exceptions.ClientError as exc:
            raise self._refusal(exc, action, what) from exc
        except _UNREACHABLE as exc:
            raise StoreUnavailableError(
                f"{self.name}: the S3 server at {self._where()} does not answer "
                f"({action} {what}: {type(exc).__name__})"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StorageError(
                f"{self.name}: {action} {what} at {self._where()} failed: {exc}"
            ) from exc

    def _refusal(self, exc: botocore.exceptions.ClientError, action: str, what: str) -> Exception:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        where = f"{self.name}: {action} {what} at {self._where()}"
        if code in _MISSING_CODES:
            return _ObjectMissing()
        if code == "NoSuchBucket":
            return _BucketMissing(f"{where}: bucket {self.bucket!r} does not exist: run "
                                "`dfsfs init` (it creates missing buckets)")
        if code in _TRANSIENT_CODES or status >= 500:
            return StoreUnavailableError(f"{where}: the server answered {code} (busy or down)")
        if code == "InvalidAccessKeyId":
            return StorageError(f"{where}: the S3 server does not know the access key: check "
                                "the store's credentials (credentials= file or AWS_ACCESS_KEY_ID)")
        if code == "SignatureDoesNotMatch":
            return StorageError(f"{where}: the secret key does not match the access key: check "
                                "the store's credentials (credentials= file or "
                                "AWS_SECRET_ACCESS_KEY)")
        if code in _DENIED_CODES:
            return StorageError(
                f"{where}: access denied: the credentials lack {PERMISSIONS[action]} on bucket "
                f"{self.bucket!r} (grant it, or use credentials that have it)"
            )
        return StorageError(f"{where} failed: {code} {error.get('Message', '')}".rstrip())

    def _where(self) -> str:
        return self.endpoint_url or "AWS S3"


class _ObjectMissing(Exception):
    """An S3 404; each caller decides what absence means for it."""


class _BucketMissing(StorageError):
    """The bucket does not exist (a StorageError for every caller but the bucket check)."""


def _parse_object_name(name: str) -> tuple[int, bytes] | None:
    """(namespace, digest) from ``<namespace>/<hex>``; None for objects not ours."""
    match = _OBJECT_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match[1]), bytes.fromhex(match[2])
