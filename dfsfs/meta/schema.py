"""The PostgreSQL schema of dfsfs, one comment per table and column.

Every user-owned table carries ``user_id`` so that each query can be scoped by it
(and row-level security can enforce the same scoping inside PostgreSQL).
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    func,
)

metadata = MetaData()

# The applied migration versions; the highest one is the schema's version.
schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),  # migration number
    Column("applied_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Accounts. One namespace (root directory) per account.
users = Table(
    "users",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("name", Text, nullable=False, unique=True),  # login name, validated by auth
    Column("is_admin", Boolean, nullable=False, server_default="false"),
    Column("root_ino", BigInteger),  # the namespace's root directory (inodes.id)
    Column("quota_bytes", BigInteger),  # logical bytes allowed; NULL = unlimited
    Column("quota_inodes", BigInteger),  # inodes allowed; NULL = unlimited
    Column("failed_logins", Integer, nullable=False, server_default="0"),  # since last success
    Column("throttled_until", DateTime(timezone=True)),  # no login attempt before this
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_fsck_at", DateTime(timezone=True)),  # end of the last fsck covering this user
    Column("unix_user", Text),  # Linux login owning its local chunk directories (migration 7)
)
# Migration 7 keeps login verifiers (salt, argon2 parameters, SHA-256 of the client key),
# login nonces, the throttling state of unknown names, per-account stores and the trust
# settings in tables of their own that only the owner role reads (see 0007_trust.sql).

# Usage counters, kept incrementally by the metadata store in the same transaction
# as the change they count (fsck verifies and corrects them).
usage = Table(
    "usage",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("files", BigInteger, nullable=False, server_default="0"),  # regular files (and fifos)
    Column("directories", BigInteger, nullable=False, server_default="0"),
    Column("symlinks", BigInteger, nullable=False, server_default="0"),
    Column("logical_bytes", BigInteger, nullable=False, server_default="0"),  # sum of file sizes
    Column("chunks", BigInteger, nullable=False, server_default="0"),  # distinct stored chunks
    Column("stored_bytes", BigInteger, nullable=False, server_default="0"),  # bytes of those chunks
)

# File-system objects. Times are nanoseconds since the epoch.
inodes = Table(
    "inodes",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("mode", Integer, nullable=False),  # file type and permission bits (st_mode)
    Column("uid", Integer, nullable=False),
    Column("gid", Integer, nullable=False),
    Column("size", BigInteger, nullable=False, server_default="0"),  # logical size in bytes
    Column("nlink", Integer, nullable=False, server_default="1"),  # directory entries naming it
    Column("atime_ns", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("ctime_ns", BigInteger, nullable=False),
    Column("rdev", BigInteger, nullable=False, server_default="0"),  # device number (mknod)
    Column("target", LargeBinary),  # symlink target, bytes as given
    CheckConstraint("nlink >= 0", name="inodes_nlink_nonnegative"),
    CheckConstraint("size >= 0", name="inodes_size_nonnegative"),
)
# Inodes left without a name (a crashed mount's open-but-unlinked files). No index on
# user_id alone: the planner's generic plans then scanned a user's inodes for lookups by id.
Index("inodes_unlinked", inodes.c.user_id, postgresql_where=inodes.c.nlink == 0)

# Directory entries. Names are bytes: Linux names need not be valid UTF-8.
dentries = Table(
    "dentries",
    metadata,
    Column("id", BigInteger, primary_key=True),  # stable readdir offset
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("parent_ino", BigInteger, ForeignKey("inodes.id", ondelete="CASCADE"), nullable=False),
    Column("name", LargeBinary, nullable=False),  # 1..255 bytes, no '/' or NUL
    Column("ino", BigInteger, ForeignKey("inodes.id", ondelete="CASCADE"), nullable=False),
    UniqueConstraint("parent_ino", "name", name="dentries_parent_name"),
)
Index("dentries_ino", dentries.c.ino)

# Stored chunks, content-addressed per user: identical chunks of one user are stored
# once; different users never share a chunk.
chunks = Table(
    "chunks",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("sha256", LargeBinary(32), nullable=False),  # digest of the chunk's bytes
    Column("size", Integer, nullable=False),  # bytes in the chunk
    Column("refcount", BigInteger, nullable=False),  # file_chunks rows pointing here
    Column("backed_up", Boolean, nullable=False, server_default="true"),  # backup copy written
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("user_id", "sha256", name="chunks_user_sha256"),
    CheckConstraint("refcount >= 0", name="chunks_refcount_nonnegative"),
)

# File contents: chunk `index` covers bytes [index * chunk_size, (index + 1) * chunk_size).
# A missing index is a hole and reads as zeros.
file_chunks = Table(
    "file_chunks",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("ino", BigInteger, ForeignKey("inodes.id", ondelete="CASCADE"), primary_key=True),
    Column("index", BigInteger, primary_key=True),
    Column("chunk_id", BigInteger, ForeignKey("chunks.id"), nullable=False),
)
Index("file_chunks_chunk", file_chunks.c.chunk_id)

# Extended attributes.
xattrs = Table(
    "xattrs",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("ino", BigInteger, ForeignKey("inodes.id", ondelete="CASCADE"), primary_key=True),
    Column("name", LargeBinary, primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

# Chunks found missing or corrupt in a store, and whether they were repaired.
damage = Table(
    "damage",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("sha256", LargeBinary(32), nullable=False),  # the damaged chunk
    Column("store", Text, nullable=False),  # 'primary' or 'backup'
    Column("kind", Text, nullable=False),  # 'missing' or 'corrupt'
    Column("detected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("repaired_at", DateTime(timezone=True)),  # NULL while no good copy was restored
    Column("detail", Text),  # what was observed, for the administrator
)
Index("damage_user_unrepaired", damage.c.user_id, damage.c.repaired_at)

# Backup copies still to be written (asynchronous backup mode); survives restarts.
backup_queue = Table(
    "backup_queue",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("sha256", LargeBinary(32), primary_key=True),
    Column("enqueued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Tables holding one user's rows; row-level security scopes them by user_id.
USER_OWNED_TABLES = (
    usage, inodes, dentries, chunks, file_chunks, xattrs, damage, backup_queue,
)
