"""Read-only usage queries shared by the CLI (`dfsfs stats`) and statfs.

The counters come from the `usage` table, which the metadata store keeps incrementally in
the same transaction as each change (and `dfsfs fsck` verifies); only the largest
directories need a walk of the tree. Every query is scoped by the user id it is given.

The dictionaries returned have stable keys, documented in docs/stats.md.
"""

import stat
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dfsfs.meta.db import run_transaction

DEFAULT_TOP_N = 10
FILE_TYPE_MASK = 0o170000  # the file type bits of st_mode (S_IFMT)

_SUMMARY_SQL = """
SELECT a.name, u.files, u.directories, u.symlinks, u.logical_bytes, u.chunks, u.stored_bytes,
       a.quota_bytes, a.quota_inodes, a.last_fsck_at,
       (SELECT count(*) FROM chunks c WHERE c.user_id = :uid AND c.backed_up AND NOT EXISTS
            (SELECT 1 FROM backup_queue q WHERE q.user_id = :uid AND q.sha256 = c.sha256))
           AS backed_up,
       (SELECT count(*) FROM backup_queue q WHERE q.user_id = :uid) AS pending_backup,
       (SELECT count(*) FROM damage d WHERE d.user_id = :uid AND d.repaired_at IS NOT NULL)
           AS damage_repaired,
       (SELECT count(*) FROM damage d WHERE d.user_id = :uid AND d.repaired_at IS NULL)
           AS damage_unrepaired
FROM users a JOIN usage u ON u.user_id = a.id
WHERE a.id = :uid
"""

# Walks down from the root: every directory and every name below it, with the inode ids
# and names on the way. Each file's size then counts once toward each directory above it
# (a file hard-linked twice inside one directory's subtree counts once there).
_LARGEST_DIRECTORIES_SQL = """
WITH RECURSIVE tree(ino, is_dir, ancestors, names) AS (
    SELECT a.root_ino, true, ARRAY[]::bigint[], ARRAY[]::bytea[]
    FROM users a WHERE a.id = :uid
  UNION ALL
    SELECT d.ino, i.mode & :ifmt = :ifdir,
           array_append(t.ancestors, t.ino), array_append(t.names, d.name)
    FROM tree t
    JOIN dentries d ON d.parent_ino = t.ino AND d.user_id = :uid
    JOIN inodes i ON i.id = d.ino AND i.user_id = :uid
    WHERE t.is_dir
),
sizes AS (
    SELECT DISTINCT ancestor, t.ino, i.size
    FROM tree t JOIN inodes i ON i.id = t.ino AND i.user_id = :uid,
         unnest(t.ancestors) AS ancestor
    WHERE NOT t.is_dir
),
totals AS (
    SELECT ancestor AS ino, sum(size) AS bytes FROM sizes GROUP BY ancestor
)
SELECT t.names, totals.bytes
FROM totals JOIN tree t ON t.ino = totals.ino AND t.is_dir
WHERE cardinality(t.names) > 0
ORDER BY totals.bytes DESC, t.names
LIMIT :top_n
"""


def user_stats(engine: Engine, user_id: int, chunk_size: int, top_n: int = DEFAULT_TOP_N) -> dict:
    """The usage of one account; `chunk_size` is the database's recorded one."""
    return run_transaction(engine, lambda conn: _user_stats(conn, user_id, chunk_size, top_n))


def all_stats(engine: Engine, chunk_size: int, top_n: int = DEFAULT_TOP_N) -> list[dict]:
    """The usage of every account, ordered by name (needs an admin engine)."""

    def work(conn: Connection) -> list[dict]:
        user_ids = conn.execute(sa.text("SELECT id FROM users ORDER BY name")).scalars().all()
        return [_user_stats(conn, user_id, chunk_size, top_n) for user_id in user_ids]

    return run_transaction(engine, work)


def _user_stats(conn: Connection, user_id: int, chunk_size: int, top_n: int) -> dict:
    row = conn.execute(sa.text(_SUMMARY_SQL), {"uid": user_id}).mappings().one()
    inodes = row["files"] + row["directories"] + row["symlinks"]
    return {
        "user": row["name"],
        "user_id": user_id,
        "files": row["files"],
        "directories": row["directories"],
        "symlinks": row["symlinks"],
        "logical_bytes": row["logical_bytes"],
        "stored_bytes": row["stored_bytes"],
        "dedup_ratio": _ratio(row["logical_bytes"], row["stored_bytes"]),
        "chunk_count": row["chunks"],
        "chunk_size": chunk_size,
        "quota_bytes": row["quota_bytes"],
        "quota_inodes": row["quota_inodes"],
        "quota_bytes_used_pct": _percent(row["logical_bytes"], row["quota_bytes"]),
        "quota_inodes_used_pct": _percent(inodes, row["quota_inodes"]),
        "backup": {
            "chunks_backed_up": row["backed_up"],
            "chunks_pending_backup": row["pending_backup"],
        },
        "integrity": {
            "damage_repaired": row["damage_repaired"],
            "damage_unrepaired": row["damage_unrepaired"],
        },
        "last_fsck_at": row["last_fsck_at"].isoformat() if row["last_fsck_at"] else None,
        "largest_directories": _largest_directories(conn, user_id, top_n) if top_n > 0 else [],
    }


def _largest_directories(conn: Connection, user_id: int, top_n: int) -> list[dict]:
    rows = conn.execute(
        sa.text(_LARGEST_DIRECTORIES_SQL),
        {"uid": user_id, "top_n": top_n, "ifmt": FILE_TYPE_MASK, "ifdir": stat.S_IFDIR},
    )
    return [{"path": display_path(names), "bytes": int(total)} for names, total in rows]


def _ratio(logical_bytes: int, stored_bytes: int) -> float | None:
    return round(logical_bytes / stored_bytes, 4) if stored_bytes else None


def _percent(used: int, quota: int | None) -> float | None:
    if quota is None:
        return None
    return round(100 * used / quota, 1) if quota else 100.0


def display_name(name: bytes) -> str:
    """A file name for people: UTF-8 as is, any other byte as a backslash escape (\\xff)."""
    return bytes(name).decode("utf-8", errors="backslashreplace")


def display_path(names: Iterable[bytes]) -> str:
    """The path from the namespace's root through `names`, e.g. /photos/2024."""
    return "/" + "/".join(display_name(name) for name in names)
