"""Chunk storage: where the bytes of files live, addressed by (user id, SHA-256)."""

from dfsfs.chunks.base import ChunkMissingError, ChunkStore, check_key, check_namespace, digest_of
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.chunks.mirrored import BackupQueue, CheckResult, DamageEvent, MirroredChunkStore
from dfsfs.chunks.s3 import S3ChunkStore
from dfsfs.chunks.url import open_store

__all__ = [
    "BackupQueue",
    "CheckResult",
    "ChunkMissingError",
    "ChunkStore",
    "DamageEvent",
    "LocalChunkStore",
    "MirroredChunkStore",
    "S3ChunkStore",
    "check_key",
    "check_namespace",
    "digest_of",
    "open_store",
]
