"""Values shared by the layers: what the metadata store returns and the core hands up."""

import stat as stat_module
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Attrs:
    """An inode's attributes as stored."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    stored_bytes: int = 0  # bytes of chunks holding its contents (holes take none)

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat_module.S_ISREG(self.mode)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A file chunk's content: the chunk's digest and its stored length."""

    digest: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Usage:
    files: int
    directories: int
    symlinks: int
    logical_bytes: int
    chunks: int
    stored_bytes: int
    quota_bytes: int | None
    quota_inodes: int | None

    @property
    def inodes(self) -> int:
        return self.files + self.directories + self.symlinks


@dataclass(frozen=True, slots=True)
class ReclaimableChunk:
    """A chunk left with no reference and no hold: its bytes may go (see core/removals)."""

    id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class QueuedRemoval:
    """A name to remove (see MetadataStore.unlink_each)."""

    parent_ino: int
    name: bytes
    now_ns: int
    directory: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on a chunk row for one or more file chunks about to point at it."""

    digest: bytes
    chunk_id: int | None  # None: its bytes are being deleted right now; ask again
    must_store: bool  # the bytes may be absent or not durable: put them, settle them


@dataclass(frozen=True)
class FileCommit:
    """What one file's commit sets: size, attributes, and the chunks at chunk indices."""

    ino: int
    size: int
    chunks: dict[int, "ChunkRef | None"]  # chunk index → a chunk this mount put; None: a hole
    drop_from_index: int | None = None  # indices from here on lose their chunks
    changes: dict[str, int] | None = None  # any of mtime_ns, ctime_ns, atime_ns, mode, uid, gid


@dataclass(frozen=True)
class Recovery:
    """What sessions that ended without cleaning up left (see MetadataStore.recover)."""

    ended_sessions: int
    purged_inodes: list[int]
    reclaimable: list[ReclaimableChunk]
    unsettled: list[ReclaimableChunk]  # (id, digest) of chunks whose bytes may not be durable
    deleting: list[ReclaimableChunk]  # chunks a dead session was deleting
