"""MetadataStore: every metadata transaction of one user's file system.

Each public method runs in exactly one transaction (via run_transaction, which retries
serialization failures and deadlocks) and every statement is scoped by the store's
user id. The connection is also scoped by row-level security, so even a statement that
forgot its filter could not reach another user's rows. Blocking: callers run these in
worker threads.
"""

import functools
import re
import stat as stat_module
from collections import Counter
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

import psycopg2
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import (
    ExistsError,
    InvalidArgumentError,
    IsDirectoryError,
    NoAttributeError,
    NotDirectoryError,
    NotEmptyError,
    NotFoundError,
    QuotaExceededError,
)
from dfsfs.meta.db import run_transaction

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

INODE_COLUMNS = "i.id, i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.mtime_ns, i.ctime_ns, i.rdev"


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

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)


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
    id: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Removal:
    """What removing a name did to its inode."""

    attrs: Attrs  # after the removal
    purged: bool  # the inode had no name and no open handle left, and is gone
    reclaimable: list[ReclaimableChunk]  # chunks left without references, for `reclaim`


_NAMED_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    """':name' parameters as psycopg2's '%(name)s'."""
    return _NAMED_PARAMETER.sub(r"%(\1)s", sql)


class _Result:
    """The few result accessors the store uses, over a DBAPI cursor."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor):
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def first(self):
        return self._cursor.fetchone() if self._cursor.description else None

    def one(self):
        row = self.first()
        if row is None:
            raise AssertionError("statement returned no row")
        return row

    def all(self) -> list:
        return self._cursor.fetchall() if self._cursor.description else []

    def scalar(self):
        row = self.first()
        return None if row is None else row[0]

    def __iter__(self):
        return iter(self.all())


def _attrs(row) -> Attrs:
    return Attrs(*row[:10])


def _increments(deltas: dict[str, int]) -> str:
    """SET clause adding each `:column` parameter to its column."""
    return ", ".join(f"{column} = {column} + :{column}" for column in deltas)


def _counter_column(mode: int) -> str:
    if stat_module.S_ISDIR(mode):
        return "directories"
    if stat_module.S_ISLNK(mode):
        return "symlinks"
    return "files"


class MetadataStore:
    """The metadata of one user's namespace. `ino` values are inode ids of that user."""

    def __init__(self, engine: Engine, user_id: int):
        self.engine = engine
        self.user_id = user_id
        self._relaxed_commits = 0  # transactions committed so far without a WAL flush
        self._durable_up_to = 0  # ... of which this many are known flushed
        self.root_ino = self._run(self._root_ino)

    def _run(self, work: Callable[[Connection], object], durable: bool = False):
        """One transaction. Unless `durable`, it may commit without waiting for the WAL
        flush (when the engine relaxes commits): such changes become durable with the
        next durable commit, as PostgreSQL flushes its WAL in order."""
        if not durable:
            result = run_transaction(self.engine, work)
            self._relaxed_commits += 1
            return result
        covered = self._relaxed_commits

        def durably(conn):
            conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
            return work(conn)

        result = run_transaction(self.engine, durably)
        self._durable_up_to = max(self._durable_up_to, covered)
        return result

    @property
    def has_relaxed_commits(self) -> bool:
        """Whether some commit may not be on stable storage yet."""
        return self._relaxed_commits > self._durable_up_to

    def make_durable(self) -> None:
        """fsync, fsyncdir and close: flush every commit made so far to stable storage."""
        if self.has_relaxed_commits:
            self._run(lambda conn: conn.exec_driver_sql("SELECT txid_current()"), durable=True)

    def _exec(self, conn: Connection, sql: str, **params) -> "_Result":
        """Run one statement on the transaction's DBAPI connection (SQLAlchemy's statement
        layer costs more than the query itself on these short, hot statements)."""
        if "uid" in params:
            raise AssertionError("':uid' is reserved for the account id")
        params["uid"] = self.user_id
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.execute(_pyformat(sql), params)
        except psycopg2.Error as error:
            disconnected = error.pgcode is None and isinstance(
                error, (psycopg2.OperationalError, psycopg2.InterfaceError))
            raise DBAPIError.instance(sql, params, error, psycopg2.Error,
                                      connection_invalidated=disconnected) from error
        return _Result(cursor)

    def _root_ino(self, conn: Connection) -> int:
        root = self._exec(conn, "SELECT root_ino FROM users WHERE id = :uid").scalar()
        if root is None:
            raise NotFoundError(f"user {self.user_id} has no namespace")
        return root

    # ---- reading ----------------------------------------------------------------

    def get_attrs(self, ino: int) -> Attrs:
        return self._run(lambda conn: self._get_attrs(conn, ino))

    def _get_attrs(self, conn: Connection, ino: int, lock: bool = False) -> Attrs:
        row = self._exec(
            conn,
            f"SELECT {INODE_COLUMNS} FROM inodes i WHERE i.id = :ino AND i.user_id = :uid"
            + (" FOR UPDATE" if lock else ""),
            ino=ino,
        ).first()
        if row is None:
            raise NotFoundError(f"inode {ino} does not exist")
        return _attrs(row)

    def lookup(self, parent_ino: int, name: bytes) -> Attrs:
        return self._run(lambda conn: self._lookup(conn, parent_ino, name))

    def _lookup(self, conn: Connection, parent_ino: int, name: bytes) -> Attrs:
        row = self._exec(
            conn,
            f"SELECT {INODE_COLUMNS} FROM dentries d JOIN inodes i ON i.id = d.ino"
            " WHERE d.parent_ino = :parent AND d.name = :name AND d.user_id = :uid",
            parent=parent_ino,
            name=name,
        ).first()
        if row is None:
            raise NotFoundError("no such entry")
        return _attrs(row)

    def readdir(self, parent_ino: int, after_id: int, limit: int) -> list[tuple[int, bytes, Attrs]]:
        """Entries of a directory in a stable order: (entry id, name, attrs)."""

        def work(conn):
            rows = self._exec(
                conn,
                f"SELECT {INODE_COLUMNS}, d.id, d.name FROM dentries d JOIN inodes i ON i.id = d.ino"
                " WHERE d.parent_ino = :parent AND d.user_id = :uid AND d.id > :after"
                " ORDER BY d.id LIMIT :limit",
                parent=parent_ino,
                after=after_id,
                limit=limit,
            ).all()
            if not rows:
                self._require_dir(conn, parent_ino)
            return [(row[10], bytes(row[11]), _attrs(row)) for row in rows]

        return self._run(work)

    def readlink(self, ino: int) -> bytes:
        def work(conn):
            target = self._exec(
                conn, "SELECT target FROM inodes WHERE id = :ino AND user_id = :uid", ino=ino
            ).scalar()
            if target is None:
                raise InvalidArgumentError("not a symbolic link")
            return bytes(target)

        return self._run(work)

    def open_file(self, ino: int, map_up_to_size: int) -> tuple[Attrs, dict[int, ChunkRef] | None]:
        """A file's attributes, and its chunk map too when the file is at most that large."""

        def work(conn):
            attrs = self._get_attrs(conn, ino)
            if attrs.size > map_up_to_size:
                return attrs, None
            return attrs, self._chunk_map(conn, ino)

        return self._run(work)

    def chunk_map(self, ino: int) -> dict[int, ChunkRef]:
        """Every stored chunk of a file by chunk index; absent indices are holes."""
        return self._run(lambda conn: self._chunk_map(conn, ino))

    def _chunk_map(self, conn: Connection, ino: int) -> dict[int, ChunkRef]:
        rows = self._exec(
            conn,
            "SELECT fc.index, c.sha256, c.size FROM file_chunks fc"
            " JOIN chunks c ON c.id = fc.chunk_id"
            " WHERE fc.ino = :ino AND fc.user_id = :uid",
            ino=ino,
        )
        return {index: ChunkRef(bytes(digest), size) for index, digest, size in rows}

    def usage(self) -> Usage:
        def work(conn):
            row = self._exec(
                conn,
                "SELECT u.files, u.directories, u.symlinks, u.logical_bytes, u.chunks,"
                " u.stored_bytes, a.quota_bytes, a.quota_inodes"
                " FROM usage u JOIN users a ON a.id = u.user_id WHERE u.user_id = :uid",
            ).one()
            return Usage(*row)

        return self._run(work)

    def _require_dir(self, conn: Connection, ino: int) -> Attrs:
        attrs = self._get_attrs(conn, ino)
        if not attrs.is_dir:
            raise NotDirectoryError("not a directory")
        return attrs

    # ---- namespace changes --------------------------------------------------------

    def make_node(
        self,
        parent_ino: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Attrs:
        """Create a file, directory, symlink or special file named `name` in a directory."""

        def work(conn):
            self._require_dir_with_inode_room(conn, parent_ino)
            is_dir = stat_module.S_ISDIR(mode)
            row = self._exec(
                conn,
                "INSERT INTO inodes (user_id, mode, uid, gid, size, nlink,"
                " atime_ns, mtime_ns, ctime_ns, rdev, target)"
                " VALUES (:uid, :mode, :owner, :group, :size, :nlink, :now, :now, :now, :rdev, :target)"
                " RETURNING id, mode, uid, gid, size, nlink, atime_ns, mtime_ns, ctime_ns, rdev",
                mode=mode,
                owner=uid,
                group=gid,
                size=len(target) if target is not None else 0,
                nlink=2 if is_dir else 1,
                now=now_ns,
                rdev=rdev,
                target=target,
            ).one()
            attrs = _attrs(row)
            self._insert_dentry(conn, parent_ino, name, attrs.ino)
            self._touch_dir(conn, parent_ino, now_ns, nlink_delta=1 if is_dir else 0,
                            counts={_counter_column(mode): 1, "logical_bytes": attrs.size})
            return attrs

        return self._run(work)

    def _require_dir_with_inode_room(self, conn: Connection, parent_ino: int) -> None:
        """The parent must be a directory and the user below the inode quota (one query)."""
        row = self._exec(
            conn,
            "SELECT p.mode, a.quota_inodes IS NOT NULL"
            " AND u.files + u.directories + u.symlinks >= a.quota_inodes"
            " FROM inodes p JOIN users a ON a.id = p.user_id JOIN usage u ON u.user_id = p.user_id"
            " WHERE p.id = :parent AND p.user_id = :uid",
            parent=parent_ino,
        ).first()
        if row is None:
            raise NotFoundError(f"inode {parent_ino} does not exist")
        if not stat_module.S_ISDIR(row[0]):
            raise NotDirectoryError("not a directory")
        if row[1]:
            raise QuotaExceededError("inode quota exceeded")

    def link(self, ino: int, new_parent_ino: int, new_name: bytes, now_ns: int) -> Attrs:
        def work(conn):
            self._require_dir(conn, new_parent_ino)
            attrs = self._get_attrs(conn, ino, lock=True)
            if attrs.is_dir:
                raise IsDirectoryError("hard links to directories are not allowed")
            if attrs.nlink == 0:
                raise NotFoundError("the file was deleted")
            self._insert_dentry(conn, new_parent_ino, new_name, ino)
            self._touch_dir(conn, new_parent_ino, now_ns)
            row = self._exec(
                conn,
                f"UPDATE inodes i SET nlink = nlink + 1, ctime_ns = :now"
                f" WHERE id = :ino AND user_id = :uid RETURNING {INODE_COLUMNS}",
                ino=ino,
                now=now_ns,
            ).one()
            return _attrs(row)

        return self._run(work)

    def unlink(self, parent_ino: int, name: bytes, now_ns: int, *, directory: bool,
               open_inos: Container[int] = ()) -> Removal:
        """Remove a name (rmdir when `directory`).

        An inode whose nlink drops to 0 is purged in the same transaction unless it is in
        `open_inos`: then it stays, readable through its open handles, until `purge`.
        """

        def work(conn):
            target = self._lookup(conn, parent_ino, name)
            self._check_removable(conn, target, directory)
            self._exec(
                conn,
                "DELETE FROM dentries WHERE parent_ino = :parent AND name = :name AND user_id = :uid",
                parent=parent_ino,
                name=name,
            )
            self._touch_dir(conn, parent_ino, now_ns, nlink_delta=-1 if target.is_dir else 0)
            return self._remove_link(conn, target, now_ns, open_inos)

        return self._run(work)

    def _remove_link(self, conn: Connection, target: Attrs, now_ns: int,
                     open_inos: Container[int]) -> Removal:
        attrs = self._drop_link(conn, target, now_ns)
        if attrs.nlink > 0 or attrs.ino in open_inos:
            return Removal(attrs, False, [])
        return Removal(attrs, True, self._purge(conn, attrs.ino))

    def _check_removable(self, conn: Connection, target: Attrs, directory: bool) -> None:
        if directory and not target.is_dir:
            raise NotDirectoryError("not a directory")
        if not directory and target.is_dir:
            raise IsDirectoryError("is a directory")
        if target.is_dir and self._has_entries(conn, target.ino):
            raise NotEmptyError("directory not empty")

    def _has_entries(self, conn: Connection, ino: int) -> bool:
        return (
            self._exec(
                conn,
                "SELECT 1 FROM dentries WHERE parent_ino = :ino AND user_id = :uid LIMIT 1",
                ino=ino,
            ).first()
            is not None
        )

    def _drop_link(self, conn: Connection, target: Attrs, now_ns: int) -> Attrs:
        """Decrement the link count of a target whose dentry was just removed."""
        new_nlink = 0 if target.is_dir else target.nlink - 1
        row = self._exec(
            conn,
            f"UPDATE inodes i SET nlink = :nlink, ctime_ns = :now"
            f" WHERE id = :ino AND user_id = :uid RETURNING {INODE_COLUMNS}",
            ino=target.ino,
            nlink=new_nlink,
            now=now_ns,
        ).one()
        if new_nlink == 0:
            self._count(conn, **{_counter_column(target.mode): -1}, logical_bytes=-target.size)
        return _attrs(row)

    def rename(
        self,
        old_parent_ino: int,
        old_name: bytes,
        new_parent_ino: int,
        new_name: bytes,
        flags: int,
        now_ns: int,
        open_inos: Container[int] = (),
    ) -> Removal | None:
        """Rename atomically; returns what happened to a replaced inode (see `unlink`)."""

        def work(conn):
            source = self._lookup(conn, old_parent_ino, old_name)
            self._require_dir(conn, new_parent_ino)
            try:
                target = self._lookup(conn, new_parent_ino, new_name)
            except NotFoundError:
                target = None
            if source.is_dir and old_parent_ino != new_parent_ino:
                self._refuse_move_into_itself(conn, source.ino, new_parent_ino)
            if flags & RENAME_EXCHANGE:
                return self._exchange(conn, old_parent_ino, old_name, new_parent_ino, new_name,
                                      source, target, now_ns)
            if target is not None and flags & RENAME_NOREPLACE:
                raise ExistsError("target exists")
            if target is not None and target.ino == source.ino:
                return None  # both names are links to the same inode: nothing to do
            replaced = None
            if target is not None:
                self._check_replaceable(conn, source, target)
                self._exec(
                    conn,
                    "DELETE FROM dentries WHERE parent_ino = :parent AND name = :name AND user_id = :uid",
                    parent=new_parent_ino,
                    name=new_name,
                )
                if target.is_dir:
                    self._touch_dir(conn, new_parent_ino, now_ns, nlink_delta=-1)
                replaced = self._remove_link(conn, target, now_ns, open_inos)
            self._move_dentry(conn, old_parent_ino, old_name, new_parent_ino, new_name)
            self._touch_parents_after_move(conn, source, old_parent_ino, new_parent_ino, now_ns)
            return replaced

        return self._run(work)

    def _check_replaceable(self, conn: Connection, source: Attrs, target: Attrs) -> None:
        if source.is_dir and not target.is_dir:
            raise NotDirectoryError("cannot replace a non-directory with a directory")
        if not source.is_dir and target.is_dir:
            raise IsDirectoryError("cannot replace a directory with a non-directory")
        if target.is_dir and self._has_entries(conn, target.ino):
            raise NotEmptyError("target directory not empty")

    def _refuse_move_into_itself(self, conn: Connection, dir_ino: int, new_parent_ino: int) -> None:
        """A directory cannot move below itself: walk up from the new parent to the root."""
        found = self._exec(
            conn,
            "WITH RECURSIVE up(ino) AS ("
            "  SELECT CAST(:start AS bigint)"
            "  UNION SELECT d.parent_ino FROM dentries d JOIN up ON d.ino = up.ino"
            "  WHERE d.user_id = :uid)"
            " SELECT 1 FROM up WHERE ino = :dir LIMIT 1",
            start=new_parent_ino,
            dir=dir_ino,
        ).first()
        if found is not None:
            raise InvalidArgumentError("cannot move a directory into itself")

    def _move_dentry(self, conn, old_parent_ino, old_name, new_parent_ino, new_name) -> None:
        self._exec(
            conn,
            "UPDATE dentries SET parent_ino = :new_parent, name = :new_name"
            " WHERE parent_ino = :old_parent AND name = :old_name AND user_id = :uid",
            old_parent=old_parent_ino,
            old_name=old_name,
            new_parent=new_parent_ino,
            new_name=new_name,
        )

    def _touch_parents_after_move(self, conn, moved: Attrs, old_parent_ino, new_parent_ino, now_ns):
        moved_dir_across = moved.is_dir and old_parent_ino != new_parent_ino
        self._touch_dir(conn, old_parent_ino, now_ns, nlink_delta=-1 if moved_dir_across else 0)
        if new_parent_ino != old_parent_ino:
            self._touch_dir(conn, new_parent_ino, now_ns, nlink_delta=1 if moved_dir_across else 0)
        self._touch_inode(conn, moved.ino, now_ns)

    def _exchange(self, conn, old_parent_ino, old_name, new_parent_ino, new_name,
                  source: Attrs, target: Attrs | None, now_ns: int) -> None:
        if target is None:
            raise NotFoundError("RENAME_EXCHANGE target does not exist")
        if target.is_dir and old_parent_ino != new_parent_ino:
            self._refuse_move_into_itself(conn, target.ino, old_parent_ino)
        for parent, name, ino in ((old_parent_ino, old_name, target.ino),
                                  (new_parent_ino, new_name, source.ino)):
            self._exec(
                conn,
                "UPDATE dentries SET ino = :ino WHERE parent_ino = :parent AND name = :name"
                " AND user_id = :uid",
                parent=parent, name=name, ino=ino,
            )
        if old_parent_ino != new_parent_ino:
            shift = int(source.is_dir) - int(target.is_dir)
            self._touch_dir(conn, old_parent_ino, now_ns, nlink_delta=-shift)
            self._touch_dir(conn, new_parent_ino, now_ns, nlink_delta=shift)
        else:
            self._touch_dir(conn, old_parent_ino, now_ns)
        return None

    def _insert_dentry(self, conn: Connection, parent_ino: int, name: bytes, ino: int) -> None:
        inserted = self._exec(
            conn,
            "INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (:uid, :parent, :name, :ino)"
            " ON CONFLICT (parent_ino, name) DO NOTHING RETURNING id",
            parent=parent_ino,
            name=name,
            ino=ino,
        ).first()
        if inserted is None:
            raise ExistsError("file exists")  # the transaction rolls back what it did so far

    def _touch_dir(self, conn: Connection, ino: int, now_ns: int, nlink_delta: int = 0,
                   counts: dict[str, int] | None = None) -> None:
        """Update a directory's times and link count, and usage counters, in one statement."""
        counts = {column: delta for column, delta in (counts or {}).items() if delta}
        touch = (
            "UPDATE inodes SET mtime_ns = :now, ctime_ns = :now, nlink = nlink + :delta"
            " WHERE id = :ino AND user_id = :uid"
        )
        if counts:
            touch = (f"WITH touched AS ({touch} RETURNING 1)"
                     f" UPDATE usage SET {_increments(counts)} WHERE user_id = :uid")
        self._exec(conn, touch, ino=ino, now=now_ns, delta=nlink_delta, **counts)

    def _count(self, conn: Connection, **deltas: int) -> None:
        deltas = {column: delta for column, delta in deltas.items() if delta}
        if not deltas:
            return
        self._exec(conn, f"UPDATE usage SET {_increments(deltas)} WHERE user_id = :uid", **deltas)

    def _touch_inode(self, conn: Connection, ino: int, now_ns: int) -> None:
        """Its status changed (name, xattrs): a new ctime."""
        self._exec(conn, "UPDATE inodes SET ctime_ns = :now WHERE id = :ino AND user_id = :uid",
                   ino=ino, now=now_ns)

    # ---- attributes ----------------------------------------------------------------

    def set_attrs(self, ino: int, now_ns: int, **changes: int) -> Attrs:
        """Change mode, uid, gid, atime_ns or mtime_ns (not size: see commit_file)."""
        allowed = {"mode", "uid", "gid", "atime_ns", "mtime_ns"}
        if not set(changes) <= allowed:
            raise InvalidArgumentError(f"cannot set {sorted(set(changes) - allowed)}")

        def work(conn):
            # ':uid' is the account in every statement: new values get their own names.
            assignments = "".join(f", {column} = :new_{column}" for column in changes)
            row = self._exec(
                conn,
                f"UPDATE inodes i SET ctime_ns = :now{assignments}"
                f" WHERE id = :ino AND user_id = :uid RETURNING {INODE_COLUMNS}",
                ino=ino,
                now=now_ns,
                **{f"new_{column}": value for column, value in changes.items()},
            ).first()
            if row is None:
                raise NotFoundError(f"inode {ino} does not exist")
            return _attrs(row)

        return self._run(work)

    # ---- file contents ---------------------------------------------------------------

    def commit_file(
        self,
        ino: int,
        new_chunks: dict[int, ChunkRef | None],
        size: int,
        mtime_ns: int | None,
        drop_from_index: int | None = None,
        ensure_stored: Callable[[list[bytes]], None] | None = None,
    ) -> list[ReclaimableChunk]:
        """Point chunk indices at stored chunks (None = hole), set size and times.

        The chunks in `new_chunks` must already be durable in the chunk stores
        (invariant 1). Indices >= `drop_from_index` lose their chunks (truncation).
        `ensure_stored(digests)` is called, inside the transaction and holding the chunk
        rows' locks, for chunks that had no reference before: a concurrent reclaim may
        have deleted their bytes, so the caller re-stores them.
        Returns the chunks left without references, for `reclaim` after the commit.
        """

        def work(conn):
            old = self._get_attrs(conn, ino, lock=True)
            self._check_byte_quota(conn, size - old.size)
            dropped = self._drop_file_chunks(conn, ino, list(new_chunks), drop_from_index)
            stored = {index: ref for index, ref in new_chunks.items() if ref is not None}
            chunk_ids = self._reference_chunks(conn, stored, ensure_stored)
            if stored:
                self._exec(
                    conn,
                    "INSERT INTO file_chunks (user_id, ino, index, chunk_id)"
                    " SELECT :uid, :ino, unnest(CAST(:indices AS bigint[])),"
                    " unnest(CAST(:ids AS bigint[]))",
                    ino=ino,
                    indices=list(stored),
                    ids=[chunk_ids[ref.digest] for ref in stored.values()],
                )
            reclaimable = self._release_chunks(conn, dropped)
            times = ", mtime_ns = :mtime, ctime_ns = :mtime" if mtime_ns is not None else ""
            self._exec(
                conn,
                f"UPDATE inodes SET size = :size{times} WHERE id = :ino AND user_id = :uid",
                ino=ino,
                size=size,
                mtime=mtime_ns,
            )
            if old.nlink > 0:
                self._count(conn, logical_bytes=size - old.size)
            return reclaimable

        return self._run(work, durable=True)

    def _check_byte_quota(self, conn: Connection, growth: int) -> None:
        if growth <= 0:
            return
        over = self._exec(
            conn,
            "SELECT 1 FROM usage u JOIN users a ON a.id = u.user_id WHERE u.user_id = :uid"
            " AND a.quota_bytes IS NOT NULL AND u.logical_bytes + :growth > a.quota_bytes",
            growth=growth,
        ).first()
        if over is not None:
            raise QuotaExceededError("byte quota exceeded")

    def _drop_file_chunks(
        self, conn: Connection, ino: int, indices: list[int], drop_from_index: int | None
    ) -> Counter:
        rows = self._exec(
            conn,
            "DELETE FROM file_chunks WHERE ino = :ino AND user_id = :uid"
            " AND (index = ANY(CAST(:indices AS bigint[])) OR index >= :drop_from)"
            " RETURNING chunk_id",
            ino=ino,
            indices=indices,
            drop_from=drop_from_index if drop_from_index is not None else 2**62,
        )
        return Counter(chunk_id for (chunk_id,) in rows)

    def _reference_chunks(
        self,
        conn: Connection,
        refs: dict[int, ChunkRef],
        ensure_stored: Callable[[list[bytes]], None] | None,
    ) -> dict[bytes, int]:
        """Add one reference per use to each chunk row (creating rows); digest -> id."""
        if not refs:
            return {}
        uses = Counter(ref.digest for ref in refs.values())
        sizes = {ref.digest: ref.size for ref in refs.values()}
        digests = sorted(uses)  # a fixed lock order avoids deadlocks between mounts
        rows = self._exec(
            conn,
            "INSERT INTO chunks (user_id, sha256, size, refcount)"
            " SELECT :uid, d, s, n FROM unnest(CAST(:digests AS bytea[]),"
            " CAST(:sizes AS int[]), CAST(:uses AS bigint[])) AS t(d, s, n)"
            " ON CONFLICT (user_id, sha256) DO UPDATE SET refcount = chunks.refcount + EXCLUDED.refcount"
            " RETURNING id, sha256, refcount, size, (xmax = 0) AS inserted",
            digests=digests,
            sizes=[sizes[d] for d in digests],
            uses=[uses[d] for d in digests],
        ).all()
        ids = {}
        unreferenced_before = []
        new_chunks = new_bytes = 0
        for chunk_id, digest, refcount, size, inserted in rows:
            digest = bytes(digest)
            ids[digest] = chunk_id
            if refcount == uses[digest]:
                unreferenced_before.append(digest)
            if inserted:
                new_chunks += 1
                new_bytes += size
        if unreferenced_before and ensure_stored is not None:
            ensure_stored(unreferenced_before)
        self._count(conn, chunks=new_chunks, stored_bytes=new_bytes)
        return ids

    def _release_chunks(self, conn: Connection, dropped: Counter) -> list[ReclaimableChunk]:
        if not dropped:
            return []
        ids = sorted(dropped)
        rows = self._exec(
            conn,
            "UPDATE chunks c SET refcount = c.refcount - t.n"
            " FROM unnest(CAST(:ids AS bigint[]), CAST(:counts AS bigint[])) AS t(id, n)"
            " WHERE c.id = t.id AND c.user_id = :uid AND c.refcount - t.n >= 0"
            " RETURNING c.id, c.sha256, c.refcount",
            ids=ids,
            counts=[dropped[i] for i in ids],
        ).all()
        return [ReclaimableChunk(chunk_id, bytes(digest))
                for chunk_id, digest, refcount in rows if refcount == 0]

    def reclaim(self, chunk_ids: Iterable[int], delete_bytes: Callable[[list[bytes]], None]) -> int:
        """Delete chunks that still have no reference: bytes first, then the rows.

        The rows stay locked while `delete_bytes` runs, so a writer that references
        one of these chunks again waits and then re-stores it (invariant 2).
        """
        ids = sorted(set(chunk_ids))
        if not ids:
            return 0
        self.make_durable()  # the commit that dropped the references must outlive the bytes

        def work(conn):
            rows = self._exec(
                conn,
                "SELECT id, sha256, size FROM chunks WHERE id = ANY(CAST(:ids AS bigint[]))"
                " AND user_id = :uid AND refcount = 0 ORDER BY id FOR UPDATE SKIP LOCKED",
                ids=ids,
            ).all()
            if not rows:
                return 0
            delete_bytes([bytes(digest) for _, digest, _ in rows])
            self._exec(
                conn,
                "DELETE FROM chunks WHERE id = ANY(CAST(:ids AS bigint[])) AND user_id = :uid",
                ids=[row[0] for row in rows],
            )
            self._count(conn, chunks=-len(rows), stored_bytes=-sum(row[2] for row in rows))
            return len(rows)

        return self._run(work)

    def purge(self, ino: int) -> list[ReclaimableChunk]:
        """Remove an inode whose last link is gone, with its chunk references and xattrs."""

        def work(conn):
            try:
                attrs = self._get_attrs(conn, ino, lock=True)
            except NotFoundError:
                return []
            if attrs.nlink > 0:
                return []
            return self._purge(conn, ino)

        return self._run(work)

    def _purge(self, conn: Connection, ino: int) -> list[ReclaimableChunk]:
        dropped = self._drop_file_chunks(conn, ino, [], 0)
        self._exec(conn, "DELETE FROM inodes WHERE id = :ino AND user_id = :uid", ino=ino)
        return self._release_chunks(conn, dropped)

    def unlinked_inodes(self) -> list[int]:
        """Inodes with no name left (a crashed mount may not have purged them)."""

        def work(conn):
            rows = self._exec(conn, "SELECT id FROM inodes WHERE user_id = :uid AND nlink = 0")
            return [ino for (ino,) in rows]

        return self._run(work)

    # ---- extended attributes -------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        def work(conn):
            value = self._exec(
                conn,
                "SELECT value FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :uid",
                ino=ino,
                name=name,
            ).scalar()
            if value is None:
                self._get_attrs(conn, ino)
                raise NoAttributeError("no such attribute")
            return bytes(value)

        return self._run(work)

    def list_xattrs(self, ino: int) -> list[bytes]:
        def work(conn):
            self._get_attrs(conn, ino)
            rows = self._exec(
                conn, "SELECT name FROM xattrs WHERE ino = :ino AND user_id = :uid ORDER BY name",
                ino=ino,
            )
            return [bytes(name) for (name,) in rows]

        return self._run(work)

    def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int, now_ns: int) -> None:
        def work(conn):
            self._get_attrs(conn, ino, lock=True)
            exists = self._exec(
                conn,
                "SELECT 1 FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :uid",
                ino=ino,
                name=name,
            ).first() is not None
            if exists and flags & XATTR_CREATE:
                raise ExistsError("attribute exists")
            if not exists and flags & XATTR_REPLACE:
                raise NoAttributeError("no such attribute")
            self._exec(
                conn,
                "INSERT INTO xattrs (user_id, ino, name, value) VALUES (:uid, :ino, :name, :value)"
                " ON CONFLICT (ino, name) DO UPDATE SET value = EXCLUDED.value",
                ino=ino,
                name=name,
                value=value,
            )
            self._touch_inode(conn, ino, now_ns)

        self._run(work)

    def remove_xattr(self, ino: int, name: bytes, now_ns: int) -> None:
        def work(conn):
            deleted = self._exec(
                conn,
                "DELETE FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :uid",
                ino=ino,
                name=name,
            ).rowcount
            if not deleted:
                self._get_attrs(conn, ino)
                raise NoAttributeError("no such attribute")
            self._touch_inode(conn, ino, now_ns)

        self._run(work)

    # ---- damage records --------------------------------------------------------------

    def record_damage(self, digest: bytes, store: str, kind: str, repaired: bool, detail: str) -> None:
        def work(conn):
            self._exec(
                conn,
                "INSERT INTO damage (user_id, sha256, store, kind, repaired_at, detail)"
                " VALUES (:uid, :digest, :store, :kind,"
                " CASE WHEN :repaired THEN now() END, :detail)",
                digest=digest,
                store=store,
                kind=kind,
                repaired=repaired,
                detail=detail,
            )

        self._run(work)
