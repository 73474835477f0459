"""MetadataStore: every metadata call of one account's mount.

Every statement names the account (`:account`) and runs under row-level security, so even
a statement that forgot its filter could not reach another account's rows. Hot changes
are single calls of server-side functions (meta/migrations/0008_write_path.sql explains
the protocol); reads run without a transaction (one round trip each). Blocking: callers
run these in worker threads.

Durability: changes commit without waiting for PostgreSQL's WAL flush (they are visible
to every mount at once); a sync point (`settle`, `flush_wal`) commits durably, which makes
every earlier commit durable too, as the WAL is flushed in order.
"""

import functools
import os
import re
import stat as stat_module
import threading
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import (
    BusyError,
    DfsfsError,
    ExistsError,
    InvalidArgumentError,
    IsDirectoryError,
    MetadataError,
    NoAttributeError,
    NotDirectoryError,
    NotEmptyError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    StaleError,
)
from dfsfs.meta.db import Statements, run_statements, sqlstate
from dfsfs.types import (
    Attrs,
    ChunkRef,
    FileCommit,
    QueuedRemoval,
    ReclaimableChunk,
    Recovery,
    Reservation,
    Usage,
)

XATTR_CREATE = 1
XATTR_REPLACE = 2

INODE_COLUMNS = ("i.id, i.mode, i.uid, i.gid, i.size, i.nlink, i.atime_ns, i.mtime_ns, i.ctime_ns,"
                 " i.rdev, i.stored_bytes")
NODE_COLUMNS = INODE_COLUMNS.replace("i.", "node.")
COMMITTED_ATTRIBUTES = ("mtime_ns", "ctime_ns", "atime_ns", "mode", "uid", "gid")

# SQLSTATEs of the server-side functions' refusals: 'DF' and the errno.
_REFUSALS = {
    f"DF{error.errno:03d}": error
    for error in (NotFoundError, ExistsError, NotDirectoryError, IsDirectoryError,
                  NotEmptyError, QuotaExceededError, StaleError, InvalidArgumentError,
                  PermissionDeniedError, BusyError)
}
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
    return Attrs(*row[:11])


def _chunks(chunk_ids: list[int] | None, digests: list | None) -> list[ReclaimableChunk]:
    return [ReclaimableChunk(chunk_id, bytes(digest))
            for chunk_id, digest in zip(chunk_ids or (), digests or ())]


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error else "unknown error"


def refusal(code: str) -> DfsfsError:
    """The error of a refusal code a server-side function returned."""
    error = _REFUSALS[code]
    return error(os.strerror(error.errno))


class DurabilityTracker:
    """Counts commits made without waiting for the WAL flush, and which of them a durable
    commit has covered since (it covers every commit that finished before it began)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._relaxed = 0
        self._durable_up_to = 0

    def relaxed_commit(self) -> None:
        with self._lock:
            self._relaxed += 1

    def durable_commit(self, work: Callable[[], object]):
        with self._lock:
            covered = self._relaxed
        result = work()
        with self._lock:
            self._durable_up_to = max(self._durable_up_to, covered)
        return result

    @property
    def behind(self) -> bool:
        """Whether some commit may not be on stable storage yet."""
        with self._lock:
            return self._relaxed > self._durable_up_to


class MetadataStore:
    """The metadata of one account's namespace, for one session (a mount).

    `ino` values are inode ids of that account. Holds taken by the functions (chunks being
    stored, inodes open or referenced by the kernel) belong to `session_id`.
    """

    def __init__(self, engine: Engine, account_id: int, session_id: int):
        self.engine = engine
        self.account_id = account_id
        self.session_id = session_id
        self.durability = DurabilityTracker()
        self._name_connections(engine, session_id)
        self.root_ino = self._read(self._root_ino)

    @staticmethod
    def _name_connections(engine: Engine, session_id: int) -> None:
        """Every connection says which session it works for: the change feed's payloads
        carry it, so a mount can skip its own changes."""

        @sa.event.listens_for(engine, "connect")
        def _set_session(dbapi_connection, _record):
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT set_config('dfsfs.session_id', %s, false)", (str(session_id),))
            dbapi_connection.commit()

        engine.dispose()  # connections made before this one was registered

    # ---- running statements ----------------------------------------------------------------

    def _statements(self, work: Callable[[Statements], object], **options):
        """run_statements, with every database error a DfsfsError (EIO with its SQLSTATE),
        so that no caller meets a driver exception."""
        try:
            return run_statements(self.engine, work, **options)
        except DBAPIError as error:
            raise MetadataError(f"metadata database: {_first_line(error.orig)}",
                                sqlstate(error)) from error

    def _run(self, work: Callable[[Statements], object]):
        """One transaction, committed without waiting for the WAL flush."""
        result = self._statements(work, transaction=True)
        self.durability.relaxed_commit()
        return result

    def _call(self, sql: str, **params) -> list:
        """A change made by one statement (a server-side function): one round trip."""
        rows = self._statements(lambda conn: self._exec(conn, sql, **params).all(),
                                transaction=False)
        self.durability.relaxed_commit()
        return rows

    def _call_durably(self, sql: str, **params) -> list:
        """One statement committed durably, with every commit before it."""
        return self.durability.durable_commit(lambda: self._statements(
            lambda conn: self._exec(conn, sql, **params).all(), transaction=False, durable=True))

    def _read(self, work: Callable[[Statements], object]):
        """Statements that change nothing, each on its own (see Statements)."""
        return self._statements(work, transaction=False)

    def _exec(self, conn: Statements, sql: str, **params) -> _Result:
        """Run one statement on the call's DBAPI connection (SQLAlchemy's statement layer
        costs more than the query itself on these short, hot statements)."""
        params["account"] = self.account_id
        params["session"] = self.session_id
        try:
            return _Result(conn.execute(_pyformat(sql), params))
        except DBAPIError as error:
            code = sqlstate(error) or ""
            if code not in _REFUSALS:
                raise
            raise _REFUSALS[code](error.orig.diag.message_primary) from None

    def _root_ino(self, conn: Statements) -> int:
        root = self._exec(conn, "SELECT root_ino FROM users WHERE id = :account").scalar()
        if root is None:
            raise NotFoundError(f"account {self.account_id} has no namespace")
        return root

    # ---- durability ---------------------------------------------------------------------------

    def flush_wal(self) -> None:
        """Make every commit so far durable (a sync point with no chunk to settle)."""
        if self.durability.behind:
            self.settle([])

    def settle(self, digests: list[bytes]) -> int:
        """A sync point: the bytes of these chunks are durable in the stores now. Committed
        durably, so every earlier commit of this mount is durable with it."""
        rows = self._call_durably(
            "SELECT dfsfs_settle(:account, :session, CAST(:digests AS bytea[]))", digests=digests)
        return rows[0][0]

    # ---- reading ----------------------------------------------------------------

    def get_attrs(self, ino: int) -> Attrs:
        return self._read(lambda conn: self._get_attrs(conn, ino))

    def _get_attrs(self, conn: Statements, ino: int, lock: bool = False) -> Attrs:
        row = self._exec(
            conn,
            f"SELECT {INODE_COLUMNS} FROM inodes i WHERE i.id = :ino AND i.user_id = :account"
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
            " WHERE d.parent_ino = :parent AND d.name = :name AND d.user_id = :account",
            parent=parent_ino,
            name=name,
        ).first()
        if row is None:
            raise NotFoundError("no such entry")
        return _attrs(row)

    def readdir(self, dir_ino: int, after_id: int, limit: int
                ) -> tuple[list[tuple[int, bytes, Attrs]], int | None]:
        """Entries of a directory after entry id `after_id`, in a stable order (entry id,
        name, attrs), and the directory's parent (for '..'; None for the root), in one
        round trip."""
        rows = self._read(lambda conn: self._exec(
            conn,
            f"SELECT dir.mode, dir.parent, {INODE_COLUMNS}, e.id, e.name FROM (SELECT"
            "   (SELECT mode FROM inodes WHERE id = :dir AND user_id = :account) AS mode,"
            "   (SELECT parent_ino FROM dentries WHERE ino = :dir AND user_id = :account LIMIT 1)"
            "   AS parent) dir"
            " LEFT JOIN LATERAL (SELECT d.id, d.name, d.ino FROM dentries d"
            "   WHERE d.parent_ino = :dir AND d.user_id = :account AND d.id > :after"
            "   ORDER BY d.id LIMIT :limit) e ON true"
            " LEFT JOIN inodes i ON i.id = e.ino ORDER BY e.id",
            dir=dir_ino, after=after_id, limit=limit).all())
        mode, parent = rows[0][0], rows[0][1]
        if mode is None:
            raise NotFoundError(f"inode {dir_ino} does not exist")
        if not stat_module.S_ISDIR(mode):
            raise NotDirectoryError("not a directory")
        entries = [(row[13], bytes(row[14]), _attrs(row[2:])) for row in rows if row[13] is not None]
        return entries, parent

    def readlink(self, ino: int) -> bytes:
        def work(conn):
            target = self._exec(
                conn, "SELECT target FROM inodes WHERE id = :ino AND user_id = :account", ino=ino
            ).scalar()
            if target is None:
                raise InvalidArgumentError("not a symbolic link")
            return bytes(target)

        return self._read(work)

    def open_file(self, ino: int, map_up_to_size: int) -> tuple[Attrs, dict[int, ChunkRef] | None]:
        """Open a file for this session (which then holds it: it stays readable here when
        its names go): its attributes, and its chunk map when it is at most that large."""
        row = self._call(
            f"SELECT {NODE_COLUMNS}, r.indices, r.digests, r.sizes"
            " FROM dfsfs_open(:account, :session, :ino, :up_to) AS r, LATERAL (SELECT (r.node).*) node",
            ino=ino, up_to=map_up_to_size)[0]
        if row[11] is None:
            return _attrs(row), None
        return _attrs(row), {index: ChunkRef(bytes(digest), size)
                             for index, digest, size in zip(row[11], row[12], row[13])}

    def chunk_map(self, ino: int) -> dict[int, ChunkRef]:
        """Every stored chunk of a file by chunk index; absent indices are holes."""
        return self._read(lambda conn: self._chunk_map(conn, ino))

    def _chunk_map(self, conn: Statements, ino: int) -> dict[int, ChunkRef]:
        rows = self._exec(
            conn,
            "SELECT fc.index, c.sha256, c.size FROM file_chunks fc"
            " JOIN chunks c ON c.id = fc.chunk_id"
            " WHERE fc.ino = :ino AND fc.user_id = :account",
            ino=ino,
        )
        return {index: ChunkRef(bytes(digest), size) for index, digest, size in rows}

    def usage(self) -> Usage:
        def work(conn):
            row = self._exec(
                conn,
                "SELECT u.files, u.directories, u.symlinks, u.logical_bytes, u.chunks,"
                " u.stored_bytes, a.quota_bytes, a.quota_inodes"
                " FROM usage u JOIN users a ON a.id = u.user_id WHERE u.user_id = :account",
            ).one()
            return Usage(*row)

        return self._read(work)

    # ---- namespace changes --------------------------------------------------------

    def make_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
                  now_ns: int, rdev: int = 0, target: bytes | None = None,
                  hold: bool = False) -> Attrs:
        """Create a file, directory, symlink or special file named `name` in a directory;
        with `hold`, this session holds it (a file created open)."""
        row, = self._call(
            f"SELECT {NODE_COLUMNS} FROM dfsfs_make_node(:account, :session, :parent, :name,"
            " :mode, :owner, :group, :now, :rdev, :target, :hold) AS node",
            parent=parent_ino, name=name, mode=mode, owner=uid, group=gid, now=now_ns,
            rdev=rdev, target=target, hold=hold,
        )
        return _attrs(row)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes, now_ns: int) -> Attrs:
        """A new name for a file (see dfsfs_link, migration 9): its attributes after."""
        row, = self._call(
            f"SELECT {NODE_COLUMNS} FROM dfsfs_link(:account, :ino, :parent, :name, :now) AS node",
            ino=ino, parent=new_parent_ino, name=new_name, now=now_ns)
        return _attrs(row)

    def unlink_each(self, removals: list[QueuedRemoval]) -> list[Attrs | DfsfsError]:
        """Remove many names, in order, in one call (rmdir for `directory` ones). Each
        gets the removed inode's attributes after (nlink 0: no name left; this session
        then holds it until `release_inodes`), or its error; the rest go on."""
        rows = self._call(
            f"SELECT r.refusal, {NODE_COLUMNS} FROM dfsfs_unlink_each(:account, :session,"
            " CAST(:parents AS bigint[]), CAST(:names AS bytea[]), CAST(:times AS bigint[]),"
            " CAST(:directories AS boolean[])) AS r, LATERAL (SELECT (r.node).*) node"
            " ORDER BY r.item",
            parents=[r.parent_ino for r in removals], names=[r.name for r in removals],
            times=[r.now_ns for r in removals], directories=[r.directory for r in removals],
        )
        return [_attrs(row[1:]) if row[0] is None else refusal(row[0]) for row in rows]

    def release_inodes(self, inos: list[int]) -> tuple[list[int], list[ReclaimableChunk]]:
        """This session no longer holds these inodes; those with no name and no live
        holder are purged. Returns the purged inodes and the chunks left without references."""
        row, = self._call(
            "SELECT r.purged, r.chunk_ids, r.digests"
            " FROM dfsfs_release_inodes(:account, :session, CAST(:inos AS bigint[])) AS r",
            inos=inos)
        return list(row[0]), _chunks(row[1], row[2])

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int, now_ns: int) -> tuple[Attrs, Attrs | None]:
        """Rename atomically, serialised with every mount's renames on the server (see
        dfsfs_rename, migration 9). Returns the attributes after of the renamed inode, and
        of the inode that had the new name: replaced, it lost that name (see
        `unlink_each`); exchanged, it has the old one; None if no inode had it."""
        row, = self._call(
            f"SELECT r.replaced IS NULL, {NODE_COLUMNS.replace('node.', 'moved.')},"
            f" {NODE_COLUMNS} FROM dfsfs_rename(:account, :session,"
            " :old_parent, :old_name, :new_parent, :new_name, :flags, :now) AS r,"
            " LATERAL (SELECT (r.moved).*) moved, LATERAL (SELECT (r.replaced).*) node",
            old_parent=old_parent_ino, old_name=old_name, new_parent=new_parent_ino,
            new_name=new_name, flags=flags, now=now_ns)
        width = (len(row) - 1) // 2
        moved = _attrs(row[1:1 + width])
        return moved, None if row[0] else _attrs(row[1 + width:])

    def _touch_inode(self, conn: Statements, ino: int, now_ns: int) -> None:
        """Its status changed (name, xattrs): a new ctime."""
        self._exec(conn, "UPDATE inodes SET ctime_ns = :now WHERE id = :ino AND user_id = :account",
                   ino=ino, now=now_ns)

    # ---- attributes ----------------------------------------------------------------

    def set_attrs(self, ino: int, now_ns: int, **changes: int) -> Attrs:
        """Change mode, uid, gid, atime_ns or mtime_ns (not size: see commit_file)."""
        allowed = {"mode", "uid", "gid", "atime_ns", "mtime_ns"}
        if not set(changes) <= allowed:
            raise InvalidArgumentError(f"cannot set {sorted(set(changes) - allowed)}")

        assignments = "".join(f", {column} = :new_{column}" for column in changes)
        rows = self._call(
            f"UPDATE inodes i SET ctime_ns = :now{assignments}"
            f" WHERE id = :ino AND user_id = :account RETURNING {INODE_COLUMNS}",
            ino=ino,
            now=now_ns,
            **{f"new_{column}": value for column, value in changes.items()},
        )
        if not rows:
            raise NotFoundError(f"inode {ino} does not exist")
        return _attrs(rows[0])

    # ---- storing and committing file contents ----------------------------------------------

    def reserve_chunks(self, digests: list[bytes], sizes: list[int]) -> list[Reservation]:
        """A hold on each chunk for each use listed (see Reservation)."""
        rows = self._call(
            "SELECT r.digest, r.chunk_id, r.must_store FROM dfsfs_reserve_chunks(:account,"
            " :session, CAST(:digests AS bytea[]), CAST(:sizes AS integer[])) AS r",
            digests=digests, sizes=sizes)
        return [Reservation(bytes(digest), chunk_id, must_store)
                for digest, chunk_id, must_store in rows]

    def drop_holds(self, chunk_ids: list[int]) -> list[ReclaimableChunk]:
        """Give up one use of a hold per entry (stored, then overwritten before a commit)."""
        row, = self._call(
            "SELECT r.chunk_ids, r.digests FROM dfsfs_drop_holds(:account, :session,"
            " CAST(:ids AS bigint[])) AS r", ids=chunk_ids)
        return _chunks(*row)

    def commit_files(self, commits: list[FileCommit]
                     ) -> tuple[list[DfsfsError | None], list[ReclaimableChunk]]:
        """Commit files in one call, in order (see dfsfs_commit_files): each one's error
        or None, and the chunks left without references."""
        chunk_file, indices, digests, sizes = [], [], [], []
        for number, commit in enumerate(commits, start=1):
            for index, ref in sorted(commit.chunks.items()):
                chunk_file.append(number)
                indices.append(index)
                digests.append(None if ref is None else ref.digest)
                sizes.append(None if ref is None else ref.size)
        changes = [commit.changes or {} for commit in commits]
        unknown = {name for change in changes for name in change} - set(COMMITTED_ATTRIBUTES)
        if unknown:
            raise InvalidArgumentError(f"cannot set {sorted(unknown)}")
        row, = self._call(
            "SELECT r.refusals, r.chunk_ids, r.digests FROM dfsfs_commit_files(:account, :session,"
            " CAST(:inos AS bigint[]), CAST(:sizes AS bigint[]), CAST(:drop_from AS bigint[]),"
            " CAST(:mtimes AS bigint[]), CAST(:ctimes AS bigint[]), CAST(:atimes AS bigint[]),"
            " CAST(:modes AS integer[]), CAST(:uids AS integer[]), CAST(:gids AS integer[]),"
            " CAST(:chunk_file AS integer[]), CAST(:indices AS bigint[]),"
            " CAST(:digests AS bytea[]), CAST(:chunk_sizes AS integer[])) AS r",
            inos=[c.ino for c in commits], sizes=[c.size for c in commits],
            drop_from=[c.drop_from_index for c in commits],
            mtimes=[c.get("mtime_ns") for c in changes], ctimes=[c.get("ctime_ns") for c in changes],
            atimes=[c.get("atime_ns") for c in changes], modes=[c.get("mode") for c in changes],
            uids=[c.get("uid") for c in changes], gids=[c.get("gid") for c in changes],
            chunk_file=chunk_file, indices=indices, digests=digests, chunk_sizes=sizes,
        )
        return [None if code is None else refusal(code) for code in row[0]], _chunks(row[1], row[2])

    # ---- deleting chunk bytes ---------------------------------------------------------------

    def claim_reclaim(self, chunk_ids: list[int]) -> list[ReclaimableChunk]:
        """Mark chunks with no reference and no hold as being deleted by this session,
        durably (with every commit before, so the drop of their last reference too):
        only then may their bytes go (invariant 2). Returns those marked."""
        rows = self._call_durably(
            "SELECT r.chunk_id, r.digest FROM dfsfs_claim_reclaim(:account, :session,"
            " CAST(:ids AS bigint[])) AS r", ids=sorted(set(chunk_ids)))
        return [ReclaimableChunk(chunk_id, bytes(digest)) for chunk_id, digest in rows]

    def claim_orphans(self, digests: list[bytes]) -> list[ReclaimableChunk]:
        """Claim bytes no chunk row names for deletion (see dfsfs_claim_orphans)."""
        rows = self._call_durably(
            "SELECT r.chunk_id, r.digest FROM dfsfs_claim_orphans(:account, :session,"
            " CAST(:digests AS bytea[])) AS r", digests=sorted(set(digests)))
        return [ReclaimableChunk(chunk_id, bytes(found)) for chunk_id, found in rows]

    def finish_reclaim(self, chunk_ids: list[int]) -> int:
        """The bytes of these claimed chunks are gone: drop their rows."""
        rows = self._call("SELECT dfsfs_finish_reclaim(:account, :session, CAST(:ids AS bigint[]))",
                          ids=chunk_ids)
        return rows[0][0]

    # ---- sessions and recovery --------------------------------------------------------------

    def recover(self) -> Recovery:
        """Settle what ended sessions of the account left behind (see dfsfs_recover)."""
        row, = self._call(
            "SELECT r.ended, r.purged, r.reclaim_ids, r.reclaim_digests, r.unsettled_ids,"
            " r.unsettled_digests, r.deleting_ids, r.deleting_digests"
            " FROM dfsfs_recover(:account) AS r")
        return Recovery(row[0], list(row[1]), _chunks(row[2], row[3]), _chunks(row[4], row[5]),
                        _chunks(row[6], row[7]))

    def take_over_deletion(self, chunk_ids: list[int]) -> list[ReclaimableChunk]:
        rows = self._call_durably(
            "SELECT r.chunk_id, r.digest FROM dfsfs_take_over_deletion(:account, :session,"
            " CAST(:ids AS bigint[])) AS r", ids=chunk_ids)
        return [ReclaimableChunk(chunk_id, bytes(digest)) for chunk_id, digest in rows]

    def cut_lost(self, chunk_size: int, chunk_ids: list[int]) -> list[tuple[int, int, int]]:
        """Files naming chunks whose bytes did not survive are cut back to before the first
        of them (recorded as damage): (ino, old size, new size) of each."""
        rows = self._call_durably(
            "SELECT r.ino, r.old_size, r.new_size FROM dfsfs_cut_lost(:account, :chunk_size,"
            " CAST(:ids AS bigint[])) AS r", chunk_size=chunk_size, ids=chunk_ids)
        return [tuple(row) for row in rows]

    def sessions_on_host(self, host: str) -> list[tuple[int, int, str | None, int | None]]:
        """(id, pid, boot id, process start) of this account's sessions on `host` not ended."""
        return self._read(lambda conn: [tuple(row) for row in self._exec(
            conn, "SELECT id, pid, boot_id, process_start FROM sessions WHERE user_id = :account"
            " AND host = :host AND ended_at IS NULL AND id <> :session", host=host)])

    def end_sessions(self, session_ids: list[int], reason: str) -> int:
        rows = self._call("SELECT dfsfs_end_sessions(:account, CAST(:ids AS bigint[]), :reason)",
                          ids=session_ids, reason=reason)
        return rows[0][0]

    # ---- extended attributes -------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        def work(conn):
            value = self._exec(
                conn,
                "SELECT value FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :account",
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
                conn, "SELECT name FROM xattrs WHERE ino = :ino AND user_id = :account ORDER BY name",
                ino=ino,
            )
            return [bytes(name) for (name,) in rows]

        return self._read(work)

    def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int, now_ns: int) -> None:
        def work(conn):
            self._get_attrs(conn, ino, lock=True)
            exists = self._exec(
                conn,
                "SELECT 1 FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :account",
                ino=ino,
                name=name,
            ).first() is not None
            if exists and flags & XATTR_CREATE:
                raise ExistsError("attribute exists")
            if not exists and flags & XATTR_REPLACE:
                raise NoAttributeError("no such attribute")
            self._exec(
                conn,
                "INSERT INTO xattrs (user_id, ino, name, value) VALUES (:account, :ino, :name, :value)"
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
                "DELETE FROM xattrs WHERE ino = :ino AND name = :name AND user_id = :account",
                ino=ino,
                name=name,
            ).rowcount
            if not deleted:
                self._get_attrs(conn, ino)
                raise NoAttributeError("no such attribute")
            self._touch_inode(conn, ino, now_ns)

        self._run(work)

    def chunk_referenced(self, digest: bytes) -> bool:
        """Whether a file references (or a session holds) the chunk with this digest."""
        return self._read(lambda conn: self._exec(
            conn, "SELECT 1 FROM chunks WHERE user_id = :account AND sha256 = :digest"
            " AND refcount > 0", digest=digest).first() is not None)

    # ---- damage records --------------------------------------------------------------

    def record_damage(self, digest: bytes, store: str, kind: str, repaired: bool, detail: str) -> None:
        def work(conn):
            self._exec(
                conn,
                "INSERT INTO damage (user_id, sha256, store, kind, repaired_at, detail)"
                " VALUES (:account, :digest, :store, :kind,"
                " CASE WHEN :repaired THEN now() END, :detail)",
                digest=digest,
                store=store,
                kind=kind,
                repaired=repaired,
                detail=detail,
            )

        self._run(work)


def open_session(engine: Engine, account_id: int, purpose: str, host: str, pid: int,
                 boot_id: str | None, process_start: int | None, expiry_s: int) -> int:
    """A session of the account that holds and claims chunks in the name of this process
    (see dfsfs_open_session): alive for `expiry_s` unless ended first."""

    def work(conn: Statements) -> int:
        return conn.execute(
            "SELECT dfsfs_open_session(%(account)s, %(purpose)s, %(host)s, %(pid)s, %(boot)s,"
            " %(start)s, %(expiry)s)",
            {"account": account_id, "purpose": purpose, "host": host, "pid": pid,
             "boot": boot_id, "start": process_start, "expiry": expiry_s},
        ).fetchone()[0]

    return run_statements(engine, work, transaction=False)


def describe_session(engine: Engine, pid: int, boot_id: str | None, process_start: int | None) -> None:
    """Name this process as the one serving the login session of `engine`."""
    run_statements(engine, lambda conn: conn.execute(
        "SELECT dfsfs_describe_session(%(pid)s, %(boot)s, %(start)s)",
        {"pid": pid, "boot": boot_id, "start": process_start}), transaction=False)
