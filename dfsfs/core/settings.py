"""Every tunable of the file-system core, in one place."""

from dataclasses import dataclass

NAME_MAX = 255
RELATIME_AGE_NS = 24 * 3600 * 10**9  # relatime: an atime older than this is updated too
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536
# The largest file (as ext4 with 4 KiB blocks): sizes and offsets stay far inside
# PostgreSQL's bigint, and so do the account's summed sizes.
MAX_FILE_SIZE = 1 << 44


@dataclass(frozen=True)
class CoreSettings:
    chunk_size: int = 1 << 20
    write_buffer_bytes: int = 64 << 20  # buffered file data of the whole mount (back-pressure)
    read_cache_bytes: int = 128 << 20
    readahead_chunks: int = 4
    commit_interval_s: float = 1.0  # a closed file is durable within this (mount option commit=)
    sync_close: bool = False  # mount option sync: close() returns once the file is durable
    atime: str = "noatime"  # noatime | relatime | strictatime: when reading updates atime
    commit_batch_bytes: int = 32 << 20  # a streaming writer commits behind itself this often
    idle_commit_s: float = 5.0  # writes to a file left open are committed after this idle time
    statfs_cache_s: float = 2.0
    metadata_timeout_s: float = 8.0  # then EIO: a frozen database must not hang callers
    attr_cache_s: float = 1.0  # as long as the kernel's own attribute cache
    missing_xattr_cache_s: float = 1.0  # the kernel asks for security.capability before every write
    metadata_threads: int = 8
    chunk_threads: int = 8
