"""MetadataStore: every metadata transaction of one user's file system.

Each public method runs in exactly one transaction (via run_transaction, which retries
serialization failures and deadlocks) and every statement is scoped by the store's
user id. The connection is also scoped by row-level security, so even a statement that
forgot its filter could not reach another user's rows. Blocking: callers run these in
worker threads.
"""

import functools
import os
import re
import stat as stat_module
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import (
    DfsfsError,
    ExistsError,
    InvalidArgumentError,
    IsDirectoryError,
    NoAttributeError,
    NotDirectoryError,
    NotEmptyError,
    NotFoundError,
    QuotaExceededError,
)
from dfsfs.meta.db import Statements, run_statements, sqlstate

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

INODE_COLUMNS = "i.id, i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.mtime_ns, i.ctime_ns, i.rdev"
NODE_COLUMNS = INODE_COLUMNS.replace("i.", "node.")
COMMITTED_ATTRIBUTES = frozenset({"mtime_ns", "ctime_ns", "atime_ns", "mode", "uid", "gid"})
# What the server-side removal functions return: the inode after, whether it was purged,
# and the chunks left without references.
REMOVAL_COLUMNS = INODE_COLUMNS.replace("i.", "(r.node).") + ", r.purged, r.chunk_ids, r.digests"

# SQLSTATEs of the server-side functions' refusals (see the functions in meta/migrations).
_REFUSALS = {
    f"DF{error.errno:03d}": error
    for error in (NotFoundError, ExistsError, NotDirectoryError, IsDirectoryError,
                  NotEmptyError, QuotaExceededError)
}


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
class QueuedRemoval:
    """A name to remove (see unlink_each)."""

    parent_ino: int
    name: bytes
    now_ns: int
    directory: bool = False


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


def _reclaimable(chunk_ids: list[int], digests: list) -> list[ReclaimableChunk]:
    return [ReclaimableChunk(chunk_id, bytes(digest)) for chunk_id, digest in zip(chunk_ids, digests)]


def _refusal(code: str) -> DfsfsError:
    error = _REFUSALS[code]
    return error(os.strerror(error.errno))


def _removal(row) -> Removal:
    """A row of REMOVAL_COLUMNS."""
    return Removal(_attrs(row), row[10], _reclaimable(row[11], row[12]))


class MetadataStore:
    """The metadata of one user's namespace. `ino` values are inode ids of that user."""

    def __init__(self, engine: Engine, user_id: int):
        self.engine = engine
        self.user_id = user_id
        self._relaxed_commits = 0  # transactions committed so far without a WAL flush
        self._durable_up_to = 0  # ... of which this many are known flushed
        self.root_ino = self._read(self._root_ino)

    def _run(self, work: Callable[[Statements], object], durable: bool = False):
        """One transaction. Unless `durable`, it may commit without waiting for the WAL
        flush (when the engine relaxes commits): such changes become durable with the
        next durable commit, as PostgreSQL flushes its WAL in order."""
        return self._commit_counted(work, durable, transaction=True)

    def _call(self, sql: str, **params) -> list:
        """A change made by one statement (a server-side function): one round trip."""
        return self._commit_counted(lambda conn: self._exec(conn, sql, **params).all(),
                                    durable=False, transaction=False)

    def _commit_counted(self, work, durable: bool, transaction: bool):
        if not durable:
            result = run_statements(self.engine, work, transaction=transaction)
            self._relaxed_commits += 1
            return result
        covered = self._relaxed_commits
        result = run_statements(self.engine, work, transaction=transaction, durable=True)
        self._durable_up_to = max(self._durable_up_to, covered)
        return result

    def _read(self, work: Callable[[Statements], object]):
        """Statements that change nothing, each on its own (see Statements)."""
        return run_statements(self.engine, work, transaction=False)

    @property
    def has_relaxed_commits(self) -> bool:
        """Whether some commit may not be on stable storage yet."""
        return self._relaxed_commits > self._durable_up_to

    def make_durable(self) -> None:
        """fsync, fsyncdir and close: flush every commit made so far to stable storage."""
        if self.has_relaxed_commits:  # a commit record, flushed with everything before it
            self._commit_counted(lambda conn: self._exec(conn, "SELECT txid_current()"),
                                 durable=True, transaction=False)

    def _exec(self, conn: Statements, sql: str, **params) -> "_Result":
        """Run one statement on the call's DBAPI connection (SQLAlchemy's statement layer
        costs more than the query itself on these short, hot statements)."""
        if "uid" in params:
            raise AssertionError("':uid' is reserved for the account id")
        params["uid"] = self.user_id
        try:
            return _Result(conn.execute(_pyformat(sql), params))
        except DBAPIError as error:
            refusal = _REFUSALS.get(sqlstate(error) or "")
            if refusal is None:
                raise
            raise refusal(error.orig.diag.message_primary) from None

    def _root_ino(self, conn: Statements) -> int:
        root = self._exec(conn, "SELECT root_ino FROM users WHERE id = :uid").scalar()
        if root is None:
            raise NotFoundError(f"user {self.user_id} has no namespace")
        return root

    # ---- reading ----------------------------------------------------------------

    def get_attrs(self, ino: int) -> Attrs:
        return self._read(lambda conn: self._get_attrs(conn, ino))

    def _get_attrs(self, conn: Statements, ino: int, lock: bool = False) -> Attrs:
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
        return self._read(lambda conn: self._lookup(conn, parent_ino, name))

    def _lookup(self, conn: Statements, parent_ino: int, name: bytes) -> Attrs:
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

        return self._read(work)

    def readlink(self, ino: int) -> bytes:
        def work(conn):
            target = self._exec(
                conn, "SELECT target FROM inodes WHERE id = :ino AND user_id = :uid", ino=ino
            ).scalar()
            if target is None:
                raise InvalidArgumentError("not a symbolic link")
            return bytes(target)

        return self._read(work)

    def open_file(self, ino: int, map_up_to_size: int) -> tuple[Attrs, dict[int, ChunkRef] | None]:
        """A file's attributes, and its chunk map too when the file is at most that large."""

        def work(conn):
            attrs = self._get_attrs(conn, ino)
            if attrs.size > map_up_to_size:
                return attrs, None
            return attrs, self._chunk_map(conn, ino)

        return self._read(work)

    def chunk_map(self, ino: int) -> dict[int, ChunkRef]:
        """Every stored chunk of a file by chunk index; absent indices are holes."""
        return self._read(lambda conn: self._chunk_map(conn, ino))

    def _chunk_map(self, conn: Statements, ino: int) -> dict[int, ChunkRef]:
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

        return self._read(work)

    def _require_dir(self, conn: Statements, ino: int) -> Attrs:
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
        row, = self._call(
            f"SELECT {NODE_COLUMNS} FROM dfsfs_make_node(:uid, :parent, :name, :mode, :owner,"
            " :group, :now, :rdev, :target) AS node",
            parent=parent_ino, name=name, mode=mode, owner=uid, group=gid, now=now_ns,
            rdev=rdev, target=target,
        )
        return _attrs(row)

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
        result, = self.unlink_each([QueuedRemoval(parent_ino, name, now_ns, directory)], open_inos)
        if isinstance(result, DfsfsError):
            raise result
        return result

    def unlink_each(self, removals: list[QueuedRemoval],
                    open_inos: Container[int] = ()) -> list[Removal | DfsfsError]:
        """Remove many names, each as `unlink` would, in order, in one call; a name that
        cannot be removed gets its error in its place and the rest go on."""
        rows = self._call(
            f"SELECT r.refusal, {REMOVAL_COLUMNS} FROM dfsfs_unlink_each(:uid,"
            " CAST(:parents AS bigint[]), CAST(:names AS bytea[]), CAST(:times AS bigint[]),"
            " CAST(:directories AS boolean[]), CAST(:open AS bigint[])) AS r ORDER BY r.item",
            parents=[r.parent_ino for r in removals], names=[r.name for r in removals],
            times=[r.now_ns for r in removals], directories=[r.directory for r in removals],
            open=list(open_inos),
        )
        return [_removal(row[1:]) if row[0] is None else _refusal(row[0]) for row in rows]

    def _remove_link(self, conn: Statements, target: Attrs, now_ns: int,
                     open_inos: Container[int]) -> Removal:
        """The target's dentry was just removed: one link less, purged when none is left."""
        row = self._exec(
            conn,
            f"SELECT {REMOVAL_COLUMNS} FROM dfsfs_remove_link(:uid, :ino, :now,"
            " CAST(:open AS bigint[])) AS r",
            ino=target.ino, now=now_ns, open=list(open_inos),
        ).one()
        return _removal(row)

    def _has_entries(self, conn: Statements, ino: int) -> bool:
        return (
            self._exec(
                conn,
                "SELECT 1 FROM dentries WHERE parent_ino = :ino AND user_id = :uid LIMIT 1",
                ino=ino,
            ).first()
            is not None
        )

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

    def _check_replaceable(self, conn: Statements, source: Attrs, target: Attrs) -> None:
        if source.is_dir and not target.is_dir:
            raise NotDirectoryError("cannot replace a non-directory with a directory")
        if not source.is_dir and target.is_dir:
            raise IsDirectoryError("cannot replace a directory with a non-directory")
        if target.is_dir and self._has_entries(conn, target.ino):
            raise NotEmptyError("target directory not empty")

    def _refuse_move_into_itself(self, conn: Statements, dir_ino: int, new_parent_ino: int) -> None:
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

    def _insert_dentry(self, conn: Statements, parent_ino: int, name: bytes, ino: int) -> None:
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

    def _touch_dir(self, conn: Statements, ino: int, now_ns: int, nlink_delta: int = 0) -> None:
        """Update a directory's times and link count."""
        self._exec(
            conn,
            "UPDATE inodes SET mtime_ns = :now, ctime_ns = :now, nlink = nlink + :delta"
            " WHERE id = :ino AND user_id = :uid",
            ino=ino, now=now_ns, delta=nlink_delta,
        )

    def _count(self, conn: Statements, **deltas: int) -> None:
        """Add each delta to its usage counter."""
        deltas = {column: delta for column, delta in deltas.items() if delta}
        if not deltas:
            return
        increments = ", ".join(f"{column} = {column} + :{column}" for column in deltas)
        self._exec(conn, f"UPDATE usage SET {increments} WHERE user_id = :uid", **deltas)

    def _touch_inode(self, conn: Statements, ino: int, now_ns: int) -> None:
        """Its status changed (name, xattrs): a new ctime."""
        self._exec(conn, "UPDATE inodes SET ctime_ns = :now WHERE id = :ino AND user_id = :uid",
                   ino=ino, now=now_ns)

    # ---- attributes ----------------------------------------------------------------

    def set_attrs(self, ino: int, now_ns: int, **changes: int) -> Attrs:
        """Change mode, uid, gid, atime_ns or mtime_ns (not size: see commit_file)."""
        allowed = {"mode", "uid", "gid", "atime_ns", "mtime_ns"}
        if not set(changes) <= allowed:
            raise InvalidArgumentError(f"cannot set {sorted(set(changes) - allowed)}")

        # ':uid' is the account in every statement: new values get their own names.
        assignments = "".join(f", {column} = :new_{column}" for column in changes)
        rows = self._call(
            f"UPDATE inodes i SET ctime_ns = :now{assignments}"
            f" WHERE id = :ino AND user_id = :uid RETURNING {INODE_COLUMNS}",
            ino=ino,
            now=now_ns,
            **{f"new_{column}": value for column, value in changes.items()},
        )
        if not rows:
            raise NotFoundError(f"inode {ino} does not exist")
        return _attrs(rows[0])

    # ---- file contents ---------------------------------------------------------------

    def commit_file(
        self,
        ino: int,
        new_chunks: dict[int, ChunkRef | None],
        size: int,
        changes: Mapping[str, int] | None = None,
        drop_from_index: int | None = None,
        before_commit: Callable[[list[bytes]], None] | None = None,
    ) -> list[ReclaimableChunk]:
        """Point chunk indices at stored chunks (None = hole), set size and `changes`
        (any of mtime_ns, ctime_ns, atime_ns, mode, uid, gid).

        The chunks in `new_chunks` must be durable in the chunk stores before the
        transaction commits (invariant 1): `before_commit(digests)` is called inside it,
        holding the chunk rows' locks, just before COMMIT, with the digests that had no
        reference before. A concurrent reclaim may have deleted their bytes, so the
        caller re-stores them. It may also finish storing the new chunks then: an
        exception from it aborts the commit.
        Indices >= `drop_from_index` lose their chunks (truncation).
        Returns the chunks left without references, for `reclaim` after the commit.
        """

        indices = sorted(new_chunks)
        refs = [new_chunks[index] for index in indices]
        changes = dict(changes or {})
        if not set(changes) <= COMMITTED_ATTRIBUTES:
            raise InvalidArgumentError(f"cannot set {sorted(set(changes) - COMMITTED_ATTRIBUTES)}")

        def work(conn):
            reclaimable_ids, reclaimable_digests, unreferenced = self._exec(
                conn,
                "SELECT r.chunk_ids, r.digests, r.unreferenced FROM dfsfs_commit_file(:uid, :ino,"
                " CAST(:indices AS bigint[]), CAST(:digests AS bytea[]), CAST(:sizes AS integer[]),"
                " :size, :drop_from, :mtime, :ctime, :atime, :mode, :owner, :group) AS r",
                ino=ino,
                indices=indices,
                digests=[None if ref is None else ref.digest for ref in refs],
                sizes=[None if ref is None else ref.size for ref in refs],
                size=size,
                drop_from=drop_from_index,
                mtime=changes.get("mtime_ns"),
                ctime=changes.get("ctime_ns"),
                atime=changes.get("atime_ns"),
                mode=changes.get("mode"),
                owner=changes.get("uid"),
                group=changes.get("gid"),
            ).one()
            if before_commit is not None:
                before_commit([bytes(digest) for digest in unreferenced])  # rows locked meanwhile
            return _reclaimable(reclaimable_ids, reclaimable_digests)

        return self._run(work, durable=True)

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
            row = self._exec(
                conn, "SELECT r.chunk_ids, r.digests FROM dfsfs_purge(:uid, :ino) AS r", ino=ino,
            ).one()
            return _reclaimable(*row)

        return self._run(work)

    def unlinked_inodes(self) -> list[int]:
        """Inodes with no name left (a crashed mount may not have purged them)."""

        def work(conn):
            rows = self._exec(conn, "SELECT id FROM inodes WHERE user_id = :uid AND nlink = 0")
            return [ino for (ino,) in rows]

        return self._read(work)

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

        return self._read(work)

    def list_xattrs(self, ino: int) -> list[bytes]:
        def work(conn):
            self._get_attrs(conn, ino)
            rows = self._exec(
                conn, "SELECT name FROM xattrs WHERE ino = :ino AND user_id = :uid ORDER BY name",
                ino=ino,
            )
            return [bytes(name) for (name,) in rows]

        return self._read(work)

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
