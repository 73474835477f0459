"""The chunk-store interface every store implements with identical signatures.

A chunk is addressed by (namespace, digest): the namespace is the owning user's id,
the digest the SHA-256 of the chunk's bytes. Stores never import the metadata layer,
auth, trio or pyfuse3; they are plain blocking code that callers run in threads.
"""

import abc
import hashlib
from collections.abc import Iterator

from dfsfs.errors import InvalidKeyError

DIGEST_SIZE = 32


def check_key(namespace: int, digest: bytes) -> None:
    """Refuse anything that is not a user id and a 32-byte digest."""
    check_namespace(namespace)
    if type(digest) is not bytes or len(digest) != DIGEST_SIZE:
        raise InvalidKeyError("chunk digest must be 32 bytes of SHA-256")


def check_namespace(namespace: int) -> None:
    """Refuse anything that is not a user id (a non-negative int)."""
    if type(namespace) is not int or namespace < 0:
        raise InvalidKeyError(f"chunk namespace must be a non-negative int, not {namespace!r}")


def digest_of(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


class ChunkStore(abc.ABC):
    """A place chunks live: a local directory, an S3 bucket, or a mirrored pair."""

    #: short human name used in messages and damage records ('primary', 'backup', a URL)
    name: str = "store"

    @abc.abstractmethod
    def put(self, namespace: int, digest: bytes, data: bytes) -> None:
        """Store `data` under the key.

        On return the chunk is readable under its key; it is durable once a later
        `sync()` has returned (for a store that keeps nothing unsynced, at once).
        Concurrent puts of the same key are safe. Putting an existing key may skip the
        write (content addressing makes it the same bytes), but a later `sync()` still
        covers it.
        """

    @abc.abstractmethod
    def get(self, namespace: int, digest: bytes) -> bytes:
        """Return the stored bytes, unverified. Raises ChunkMissingError if absent."""

    @abc.abstractmethod
    def has(self, namespace: int, digest: bytes) -> bool:
        """Whether a copy is present (its content is not checked)."""

    @abc.abstractmethod
    def delete(self, namespace: int, digest: bytes) -> None:
        """Remove the chunk; deleting an absent chunk is not an error."""

    @abc.abstractmethod
    def keys(self, namespace: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Every (namespace, digest) present, or only those of one namespace."""

    def sync(self) -> None:
        """Make every put that returned before this call durable."""

    def close(self) -> None:
        """Release connections and file descriptors."""


class ChunkMissingError(KeyError):
    """The store holds no chunk under that key."""


def missing_message(store_name: str, namespace: int, digest: bytes) -> str:
    return f"{store_name}: no chunk {digest.hex()} in namespace {namespace}"
