"""fsck: check users' metadata against itself and against both chunk stores, and
with `repair` put right what can be put right.

A check of one user runs these steps in this order (each relies on those before it):
0. sessions that are over (expired, or found dead on this machine) and what they left:
   holds on inodes and chunks, chunks they put and never made durable, deletions they
   did not finish. Repair settles them as the next mount would (dfsfs/recovery.py):
   holds go, chunks the stores hold are settled, files naming chunks that did not
   survive are cut back to before them (recorded as damage), deletions are finished.
1. rows no mount could have written (a damaged or tampered database, a bug): entry names
   that are empty, over 255 bytes, '.', '..', or hold '/' or NUL; entries naming missing
   inodes or inside non-directories; directories with more than one name; inodes of no
   known file type; file sizes past the largest file; file chunks past their file's end
   or of something that is no regular file.
2. the tree: every inode with a name reaches the account's root. A directory that is its
   own ancestor (a cycle) or hangs below a removed or missing directory is cut off.
   Repair never deletes what it cannot account for: it moves it into the quarantine,
   `lost+found` in the account's root (made when first needed): cut-off subtrees (a
   cycle broken at its lowest inode), entries with invalid names or in non-directories,
   files of unknown type (as regular files, mode 0600), and file chunks past a file's
   end (as a file of their own). Only entries naming nothing are deleted.
3. link counts: a non-directory's nlink equals the entries naming it; a directory's is
   2 plus its subdirectories.
4. unlinked inodes (nlink 0) that no session holds (a broken row: a session that is
   over reports its own in step 0). Repair purges them. An unlinked file a live mount
   still has open is held by that mount's session and is no problem.
5. chunk refcounts against the file_chunks rows pointing at each chunk plus the holds
   of sessions storing it.
6. chunk rows no file references and no session holds (a crash during reclaim): repair
   deletes the bytes, then the row.
7. orphan chunk files, present in a store without a chunks row (a crash between the
   chunk write and the metadata commit): repair deletes them.
8. both copies of every referenced chunk: present, with the right SHA-256. Repair
   rewrites a bad copy from the good one. A chunk with no good copy is lost; the
   file_chunks rows pointing at it are dangling references. Every bad copy gets a damage
   record, which `dfsfs stats` shows.
9. the usage counters against a full recount. It runs last, so it also corrects the
   counters for what the steps before repaired.
Then users.last_fsck_at is set. With repair, stale temporary files of interrupted puts
are removed from local stores.

`check` records damage itself: give it a MirroredChunkStore made without `on_damage`.
"""

import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dfsfs import recovery
from dfsfs.chunks.local import LocalChunkStore
from dfsfs.chunks.mirrored import CheckResult, MirroredChunkStore
from dfsfs.core.settings import MAX_FILE_SIZE
from dfsfs.errors import NotFoundError
from dfsfs.meta.db import run_transaction
from dfsfs.meta.layout import recorded_chunk_size
from dfsfs.meta.store import MetadataStore
from dfsfs.stats import FILE_TYPE_MASK, display_path
from dfsfs.types import ReclaimableChunk

# A put takes far less than this; an older temporary file belongs to no running put.
STALE_TEMP_FILE_AGE_S = 3600
SESSION_EXPIRY_S = 3600  # fsck's own session (its claims on chunks it deletes)
BATCH_SIZE = 1000

# Kinds of findings, in the order a summary lists them.
CATEGORIES = {
    "sessions_over": "sessions that ended without cleaning up",
    "unsettled_chunks": "chunks a crashed mount never made durable",
    "invalid_names": "entries with invalid names",
    "dangling_entries": "entries naming missing inodes",
    "entries_in_non_directories": "entries inside something that is no directory",
    "linked_directories": "directories with more than one name",
    "unknown_types": "inodes of no known file type",
    "bad_sizes": "files with impossible sizes",
    "chunks_past_end": "file chunks past the end of their file",
    "cycles": "directory cycles cut off from the root",
    "detached": "subtrees cut off from the root",
    "wrong_nlink": "inodes with a wrong link count",
    "unlinked_inodes": "unlinked inodes no mount holds",
    "wrong_refcount": "chunks with a wrong reference count",
    "unreferenced_chunks": "chunk rows no file references",
    "orphan_chunks": "chunk files without metadata (orphans)",
    "unverified_copies": "chunk copies a store that did not answer could not show",
    "damaged_copies": "missing or corrupt chunk copies",
    "lost_chunks": "chunks with no good copy",
    "dangling_references": "file chunks pointing at lost chunks",
    "wrong_usage": "wrong usage counters",
}

USAGE_COLUMNS = ("files", "directories", "symlinks", "logical_bytes", "chunks", "stored_bytes")
# Parameters of the SQL that tells directories and symlinks apart by st_mode.
MODE_TYPES = {"ifmt": FILE_TYPE_MASK, "ifdir": stat.S_IFDIR, "iflnk": stat.S_IFLNK}

ProgressCallback = Callable[[int, int], None]


@dataclass
class FsckReport:
    """What a run found and repaired: counts per category and one line per problem."""

    users_checked: int = 0
    chunks_verified: int = 0
    stale_temp_files_removed: int = 0
    found: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def add(self, category: str, message: str, found: int = 1, repaired: int | bool = 0) -> None:
        repaired = found if repaired is True else int(repaired)
        self.found[category] += found
        self.repaired[category] += repaired
        if repaired:
            message += " (repaired)" if repaired == found else f" ({repaired} repaired)"
        self.problems.append(message)


def check(
    engine: Engine,
    stores: MirroredChunkStore,
    user_ids: list[int] | None = None,
    repair: bool = False,
    progress: ProgressCallback | None = None,
) -> FsckReport:
    """Check the given users (all if None), repairing if asked; see the module docstring.

    `engine` must be an admin engine. `progress(done, total)` counts verified chunks.
    """
    users = _users(engine, user_ids)
    report = FsckReport()
    tracker = _Progress(progress, sum(chunk_count for _, chunk_count in users.values()))
    for user_id, (name, chunk_count) in users.items():
        tracker.start_user(chunk_count)
        _UserCheck(engine, stores, user_id, name, repair, report, tracker).run()
        tracker.end_user()
    if repair:
        report.stale_temp_files_removed = _remove_stale_temp_files(stores)
    return report


def _users(engine: Engine, user_ids: list[int] | None) -> dict[int, tuple[str, int]]:
    """user id -> (name, chunk rows) of the users to check, in id order."""
    rows = run_transaction(
        engine,
        lambda conn: conn.execute(
            sa.text(
                "SELECT a.id, a.name, count(c.id) FROM users a LEFT JOIN chunks c ON c.user_id = a.id"
                " WHERE CAST(:ids AS bigint[]) IS NULL OR a.id = ANY(CAST(:ids AS bigint[]))"
                " GROUP BY a.id ORDER BY a.id"
            ),
            {"ids": user_ids},
        ).all(),
    )
    users = {user_id: (name, chunk_count) for user_id, name, chunk_count in rows}
    missing = set(user_ids or ()) - set(users)
    if missing:
        raise NotFoundError(f"no user with id {', '.join(map(str, sorted(missing)))}")
    return users


def _remove_stale_temp_files(stores: MirroredChunkStore) -> int:
    return sum(
        store.remove_stale_temp_files(STALE_TEMP_FILE_AGE_S)
        for store in (stores.primary, stores.backup)
        if isinstance(store, LocalChunkStore)
    )


class _Progress:
    """Chunks verified out of the chunk rows that existed when the run started."""

    def __init__(self, callback: ProgressCallback | None, total: int):
        self._callback = callback
        self.total = total
        self.done = 0
        self._user_end = 0

    def start_user(self, chunk_count: int) -> None:
        self._user_end = self.done + chunk_count

    def tick(self) -> None:
        if self.done < self._user_end:
            self._set(self.done + 1)

    def end_user(self) -> None:
        self._set(self._user_end)

    def _set(self, done: int) -> None:
        self.done = done
        if self._callback is not None:
            self._callback(done, self.total)


# Each inode's link count and the count its entries call for; a removed directory
# (nlink 0, which no entry can name) is left out.
_LINK_COUNTS_SQL = """
SELECT * FROM (
    SELECT i.id, i.nlink,
        CASE WHEN i.mode & :ifmt = :ifdir
            THEN 2 + (SELECT count(*) FROM dentries d JOIN inodes c ON c.id = d.ino
                      WHERE d.parent_ino = i.id AND d.user_id = :uid AND c.mode & :ifmt = :ifdir)
            ELSE (SELECT count(*) FROM dentries d WHERE d.ino = i.id AND d.user_id = :uid)
        END AS expected
    FROM inodes i
    WHERE i.user_id = :uid AND (i.nlink > 0 OR i.mode & :ifmt <> :ifdir)
      AND (CAST(:ino AS bigint) IS NULL OR i.id = :ino)
) counts WHERE nlink <> expected ORDER BY id
"""

# Sessions of the account that are over (expired, ended, or found dead on this machine)
# and still name something: holds, or chunks they were to settle or delete.
_SESSIONS_OVER_SQL = """
SELECT s.id, s.host, s.pid,
    (SELECT count(*) FROM chunk_holds h WHERE h.session_id = s.id)
      + (SELECT count(*) FROM inode_holds h WHERE h.session_id = s.id) AS holds,
    (SELECT count(*) FROM chunks c WHERE c.unsettled_by = s.id AND NOT c.settled) AS unsettled
FROM sessions s
WHERE s.user_id = :uid
  AND (s.ended_at IS NOT NULL OR s.expires_at <= now() OR s.id = ANY(CAST(:here AS bigint[])))
  AND (EXISTS (SELECT 1 FROM chunk_holds h WHERE h.session_id = s.id)
       OR EXISTS (SELECT 1 FROM inode_holds h WHERE h.session_id = s.id)
       OR EXISTS (SELECT 1 FROM chunks c WHERE c.user_id = :uid
                   AND ((c.unsettled_by = s.id AND NOT c.settled) OR c.deleting_by = s.id)))
ORDER BY s.id
"""

# (An unlinked inode a session that is over still holds is that session's leftover.)
_UNHELD_UNLINKED_SQL = """
SELECT i.id FROM inodes i
WHERE i.user_id = :uid AND i.nlink = 0
  AND NOT EXISTS (SELECT 1 FROM inode_holds h WHERE h.ino = i.id)
ORDER BY i.id
"""

_WRONG_REFCOUNTS_SQL = """
SELECT * FROM (
    SELECT c.id, c.sha256, c.refcount,
        (SELECT count(*) FROM file_chunks f WHERE f.chunk_id = c.id AND f.user_id = :uid)
          + (SELECT coalesce(sum(h.uses), 0) FROM chunk_holds h WHERE h.chunk_id = c.id) AS actual
    FROM chunks c
    WHERE c.user_id = :uid
      AND (CAST(:ids AS bigint[]) IS NULL OR c.id = ANY(CAST(:ids AS bigint[])))
) counts WHERE refcount <> actual ORDER BY id
"""

_REFERENCED_CHUNKS_SQL = """
SELECT c.id, c.sha256, (q.user_id IS NOT NULL) AS backup_pending
FROM chunks c LEFT JOIN backup_queue q ON q.user_id = c.user_id AND q.sha256 = c.sha256
WHERE c.user_id = :uid AND c.id > :after
  AND EXISTS (SELECT 1 FROM file_chunks f WHERE f.chunk_id = c.id AND f.user_id = :uid)
ORDER BY c.id LIMIT :limit
"""

_USAGE_RECOUNT_SQL = """
SELECT
    count(*) FILTER (WHERE nlink > 0 AND mode & :ifmt NOT IN (:ifdir, :iflnk)) AS files,
    count(*) FILTER (WHERE nlink > 0 AND mode & :ifmt = :ifdir) AS directories,
    count(*) FILTER (WHERE nlink > 0 AND mode & :ifmt = :iflnk) AS symlinks,
    coalesce(sum(size) FILTER (WHERE nlink > 0), 0) AS logical_bytes,
    (SELECT count(*) FROM chunks WHERE user_id = :uid) AS chunks,
    (SELECT coalesce(sum(size), 0) FROM chunks WHERE user_id = :uid) AS stored_bytes
FROM inodes WHERE user_id = :uid
"""

# One path of an inode (the first in byte order if it has several), walking up to the root.
_INODE_PATH_SQL = """
WITH RECURSIVE up(ino, names, depth) AS (
    SELECT d.parent_ino, ARRAY[d.name], 1 FROM dentries d WHERE d.ino = :ino AND d.user_id = :uid
  UNION ALL
    SELECT d.parent_ino, array_prepend(d.name, up.names), up.depth + 1
    FROM up JOIN dentries d ON d.ino = up.ino AND d.user_id = :uid
    WHERE up.depth < 4096
)
SELECT names FROM up WHERE ino = (SELECT root_ino FROM users WHERE id = :uid)
ORDER BY names LIMIT 1
"""


QUARANTINE = b"lost+found"
RENAME_LOCK_KEY = 1684435826  # the account's rename lock of dfsfs_rename (migration 9)
KNOWN_TYPES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
               stat.S_IFCHR, stat.S_IFBLK]
_NAME_BYTES = {"slash": b"/", "nul": b"\0", "dot": b".", "dotdot": b".."}

_INVALID_NAMES_SQL = """
SELECT d.id, d.parent_ino, d.name, d.ino FROM dentries d
WHERE d.user_id = :uid
  AND (octet_length(d.name) NOT BETWEEN 1 AND 255 OR position(:slash IN d.name) > 0
       OR position(:nul IN d.name) > 0 OR d.name = :dot OR d.name = :dotdot)
ORDER BY d.id
"""

_DANGLING_ENTRIES_SQL = """
SELECT d.id, d.parent_ino, d.name, d.ino FROM dentries d
WHERE d.user_id = :uid
  AND (NOT EXISTS (SELECT 1 FROM inodes i WHERE i.id = d.ino)
       OR NOT EXISTS (SELECT 1 FROM inodes p WHERE p.id = d.parent_ino))
ORDER BY d.id
"""

_ENTRIES_IN_NON_DIRECTORIES_SQL = """
SELECT d.id, d.parent_ino, d.name, d.ino FROM dentries d JOIN inodes p ON p.id = d.parent_ino
WHERE d.user_id = :uid AND p.mode & :ifmt <> :ifdir
ORDER BY d.id
"""

_LINKED_DIRECTORIES_SQL = """
SELECT d.ino, count(*) FROM dentries d JOIN inodes i ON i.id = d.ino
WHERE d.user_id = :uid AND i.mode & :ifmt = :ifdir
GROUP BY d.ino HAVING count(*) > 1 ORDER BY d.ino
"""

_UNKNOWN_TYPES_SQL = """
SELECT id, mode FROM inodes
WHERE user_id = :uid AND NOT (mode & :ifmt = ANY(CAST(:known AS integer[])))
ORDER BY id
"""

_BAD_SIZES_SQL = """
SELECT id, size FROM inodes WHERE user_id = :uid AND (size < 0 OR size > :largest) ORDER BY id
"""

# Chunks of a file at or past its end, or of something that is no regular file: the
# first such index and how many.
_CHUNKS_PAST_END_SQL = """
SELECT fc.ino, min(fc.index), count(*) FROM file_chunks fc JOIN inodes i ON i.id = fc.ino
WHERE fc.user_id = :uid
  AND (fc.index * CAST(:chunk_size AS bigint) >= i.size OR i.mode & :ifmt <> :ifreg)
GROUP BY fc.ino ORDER BY fc.ino
"""

_RECOUNT_STORED_SQL = """
UPDATE inodes SET stored_bytes = (SELECT coalesce(sum(c.size), 0) FROM file_chunks fc
                                  JOIN chunks c ON c.id = fc.chunk_id WHERE fc.ino = :ino)
WHERE id = :ino AND user_id = :uid
"""

# The entries of inodes with links that do not reach the root from it (each inode once:
# its entry of lowest id), with the kind of inode.
_CUT_OFF_SQL = """
WITH RECURSIVE down(ino) AS (
    SELECT root_ino FROM users WHERE id = :uid
  UNION
    SELECT d.ino FROM dentries d JOIN down ON d.parent_ino = down.ino WHERE d.user_id = :uid)
SELECT DISTINCT ON (d.ino) d.id, d.ino, d.parent_ino, d.name,
       CASE WHEN i.mode & :ifmt = :ifdir THEN 'directory' ELSE 'file' END AS kind
FROM dentries d JOIN inodes i ON i.id = d.ino
WHERE d.user_id = :uid AND i.nlink > 0 AND NOT EXISTS (SELECT 1 FROM down WHERE down.ino = d.ino)
ORDER BY d.ino, d.id
"""

_NAMELESS_SQL = """
SELECT i.id FROM inodes i
WHERE i.user_id = :uid AND i.nlink > 0 AND i.id <> (SELECT root_ino FROM users WHERE id = :uid)
  AND NOT EXISTS (SELECT 1 FROM dentries d WHERE d.ino = i.id)
ORDER BY i.id
"""

_QUARANTINE_SQL = """
SELECT d.ino FROM dentries d JOIN inodes i ON i.id = d.ino
WHERE d.user_id = :uid AND d.parent_ino = (SELECT root_ino FROM users WHERE id = :uid)
  AND d.name = :name AND i.mode & :ifmt = :ifdir
"""


@dataclass(frozen=True)
class _Entry:
    """An entry of an inode cut off from the root."""

    ino: int
    parent: int
    name: bytes
    kind: str


def _tops(cut_off: dict[int, _Entry]) -> tuple[set[int], set[int]]:
    """The inodes to move to reattach everything cut off: walking up from each, the first
    whose parent is not itself cut off (it hangs below a removed or missing directory),
    or the lowest inode of the cycle the walk ends in. Returns (tops, those on cycles)."""
    tops: set[int] = set()
    cycles: set[int] = set()
    for start in cut_off:
        path: list[int] = []
        ino = start
        while ino in cut_off and ino not in path:
            path.append(ino)
            ino = cut_off[ino].parent
        if ino in path:  # back where the walk has been: a cycle
            top = min(path[path.index(ino):])
            cycles.add(top)
        else:
            top = path[-1]
        tops.add(top)
    return tops, cycles


class _UserCheck:
    """The steps of checking one user's namespace; findings go into `report`."""

    def __init__(self, engine: Engine, stores: MirroredChunkStore, user_id: int, name: str,
                 repair: bool, report: FsckReport, progress: _Progress):
        self.engine = engine
        self.stores = stores
        self.user_id = user_id
        self.who = f"user {name}"
        self.repair = repair
        self.report = report
        self.progress = progress
        self.meta = MetadataStore(engine, user_id,
                                  recovery.open_own_session(engine, user_id, "fsck",
                                                            SESSION_EXPIRY_S))

    def run(self) -> None:
        try:
            self.sessions()
            self._check()
        finally:
            self.meta.end_sessions([self.meta.session_id], "fsck done")

    def _check(self) -> None:
        self.invalid_rows()
        self.tree()
        self.link_counts()
        self.unlinked_inodes()
        self.refcounts()
        self.unreferenced_chunks()
        self.orphan_chunks()
        self.chunk_copies()
        self.usage_counters()
        self._run(self._mark_checked)
        self.report.users_checked += 1

    def _mark_checked(self, conn: Connection) -> None:
        self._exec(conn, "UPDATE users SET last_fsck_at = now() WHERE id = :uid")

    # ---- namespace ------------------------------------------------------------------

    def link_counts(self) -> None:
        for ino, nlink, expected in self._query(_LINK_COUNTS_SQL, ino=None, **MODE_TYPES):
            description = self._describe_inode(ino)
            if self.repair:
                self._run(partial(self._fix_link_count, ino=ino))
            self.report.add(
                "wrong_nlink",
                f"{self.who}: {description} has link count {nlink}, its entries call for {expected}",
                repaired=self.repair,
            )

    def _fix_link_count(self, conn: Connection, ino: int) -> None:
        # Locked, then counted afresh: a concurrent link, which locks the inode before
        # adding its entry, cannot slip in between.
        self._exec(conn, "SELECT 1 FROM inodes WHERE id = :ino AND user_id = :uid FOR UPDATE", ino=ino)
        row = self._exec(conn, _LINK_COUNTS_SQL, ino=ino, **MODE_TYPES).first()
        if row is not None:
            self._exec(conn, "UPDATE inodes SET nlink = :nlink WHERE id = :ino AND user_id = :uid",
                       ino=ino, nlink=row.expected)

    def sessions(self) -> None:
        """Step 0: sessions that are over, and what they left (see the module docstring)."""
        ended_here = recovery.sessions_ended_here(self.meta)
        rows = self._query(_SESSIONS_OVER_SQL, here=ended_here)
        for session_id, host, pid, holds, unsettled in rows:
            self.report.add("sessions_over",
                            f"{self.who}: session {session_id} ({host}, pid {pid}) is over and left"
                            f" {holds} hold(s) and {unsettled} unsettled chunk(s)",
                            repaired=self.repair)
        if self.repair:
            done = recovery.recover(self.meta, self.stores, self._chunk_size(), ended_here)
            for ino, old_size, new_size in done.cut_files:
                self.report.add("unsettled_chunks",
                                f"{self.who}: {self._describe_inode(ino)} named chunks that did"
                                f" not survive a crash: cut from {old_size} to {new_size} bytes",
                                repaired=True)

    def _chunk_size(self) -> int:
        chunk_size = recorded_chunk_size(self.engine)
        if chunk_size is None:
            raise NotFoundError("the database records no chunk size: run `dfsfs init`")
        return chunk_size

    def unlinked_inodes(self) -> None:
        for (ino,) in self._query(_UNHELD_UNLINKED_SQL):
            if self.repair:
                purged, freed = self.meta.release_inodes([ino])
                recovery.reclaim(self.meta, self.stores, freed)
            self.report.add("unlinked_inodes",
                            f"{self.who}: inode {ino} has no name and no mount holds it",
                            repaired=self.repair)

    # ---- rows no mount writes, and the tree (steps 1 and 2) ----------------------------

    def invalid_rows(self) -> None:
        for dentry_id, parent, name, ino in self._query(_INVALID_NAMES_SQL, **_NAME_BYTES):
            moved = self.repair and self._quarantine_entry(dentry_id, f"invalid-name-{dentry_id}")
            self.report.add("invalid_names", f"{self.who}: entry {bytes(name)!r} of directory"
                            f" {parent} (inode {ino}) has an invalid name", repaired=moved)
        for dentry_id, parent, name, ino in self._query(_DANGLING_ENTRIES_SQL):
            if self.repair:  # it names nothing: nothing is lost with it
                self._run(lambda conn, i=dentry_id: self._exec(
                    conn, "DELETE FROM dentries WHERE id = :id AND user_id = :uid", id=i))
            self.report.add("dangling_entries", f"{self.who}: entry {bytes(name)!r} of directory"
                            f" {parent} names inode {ino}, which does not exist",
                            repaired=self.repair)
        for dentry_id, parent, name, ino in self._query(_ENTRIES_IN_NON_DIRECTORIES_SQL,
                                                        **MODE_TYPES):
            moved = self.repair and self._quarantine_entry(dentry_id, f"entry-{dentry_id}")
            self.report.add("entries_in_non_directories", f"{self.who}: entry {bytes(name)!r}"
                            f" (inode {ino}) is inside inode {parent}, which is no directory",
                            repaired=moved)
        for ino, names in self._query(_LINKED_DIRECTORIES_SQL, **MODE_TYPES):
            self.report.add("linked_directories", f"{self.who}: directory"
                            f" {self._describe_inode(ino)} has {names} names")
        for ino, mode in self._query(_UNKNOWN_TYPES_SQL, ifmt=FILE_TYPE_MASK, known=KNOWN_TYPES):
            if self.repair:
                self._run(partial(self._make_regular_file, ino=ino))
                for (dentry_id,) in self._query(
                        "SELECT id FROM dentries WHERE ino = :ino AND user_id = :uid", ino=ino):
                    self._quarantine_entry(dentry_id, f"unknown-type-{ino}-{dentry_id}")
            self.report.add("unknown_types", f"{self.who}: inode {ino} has mode {mode:o},"
                            " of no known file type" + (" (made a regular file, mode 600)"
                                                        if self.repair else ""),
                            repaired=self.repair)
        chunk_size = recorded_chunk_size(self.engine)
        if chunk_size is None:
            return  # a database `dfsfs init` has not finished: no chunk to place
        for ino, size in self._query(_BAD_SIZES_SQL, largest=MAX_FILE_SIZE):
            if self.repair:
                self._run(partial(self._size_to_chunks, ino=ino, chunk_size=chunk_size))
            self.report.add("bad_sizes", f"{self.who}: inode {ino} has size {size}",
                            repaired=self.repair)
        for ino, first, count in self._query(_CHUNKS_PAST_END_SQL, chunk_size=chunk_size,
                                             ifreg=stat.S_IFREG, ifmt=FILE_TYPE_MASK):
            moved = self.repair and self._quarantine_chunks(ino, first, chunk_size)
            self.report.add("chunks_past_end", f"{self.who}: {self._describe_inode(ino)} has"
                            f" {count} chunk(s) from index {first} on past its end",
                            found=count, repaired=count if moved else 0)

    def tree(self) -> None:
        """Step 2: what is cut off from the root (see the module docstring)."""
        # first inodes with links but no entry at all: given one in the quarantine (a
        # directory among them brings its subtree back with it)
        for (ino,) in self._query(_NAMELESS_SQL):
            moved = self.repair and self._run(partial(self._give_name, ino=ino))
            self.report.add("detached", f"{self.who}: inode {ino} has links but no entry",
                            repaired=moved)
        cut_off = self._cut_off()
        tops, cycles = _tops(cut_off)
        for top in sorted(tops):
            label = "cycle" if top in cycles else "detached"
            moved = self.repair and self._run(partial(self._reattach, top=top, label=label))
            kind = "a directory cycle" if top in cycles else "cut off from the root"
            self.report.add("cycles" if top in cycles else "detached",
                            f"{self.who}: inode {top} ({cut_off[top].kind}, named"
                            f" {cut_off[top].name!r} in {cut_off[top].parent}) is {kind}",
                            repaired=moved)

    def _cut_off(self) -> dict[int, "_Entry"]:
        """Entries of inodes that have links but do not reach the root, by inode."""
        return {ino: _Entry(ino, parent, bytes(name), kind)
                for _, ino, parent, name, kind in self._query(_CUT_OFF_SQL, **MODE_TYPES)}

    def _reattach(self, conn: Connection, top: int, label: str) -> bool:
        """Move a cut-off inode's entry into the quarantine, under the account's rename
        lock (renames of live mounts wait), if it is still cut off."""
        self._exec(conn, "SELECT pg_advisory_xact_lock(:key, :account)",
                   key=RENAME_LOCK_KEY, account=self.user_id % 2147483647)
        still = self._exec(conn, _CUT_OFF_SQL, **MODE_TYPES).all()
        entry = next((row for row in still if row.ino == top), None)
        if entry is None:
            return False
        return self._move_entry(conn, entry.id, f"{label}-{top}")

    def _give_name(self, conn: Connection, ino: int) -> bool:
        quarantine = self._quarantine(conn)
        name = f"nameless-{ino}".encode()
        if self._exec(conn, "SELECT 1 FROM dentries WHERE parent_ino = :p AND name = :n",
                      p=quarantine, n=name).first():
            return False
        self._exec(conn, "INSERT INTO dentries (user_id, parent_ino, name, ino)"
                   " VALUES (:uid, :p, :n, :ino)", p=quarantine, n=name, ino=ino)
        return True

    def _quarantine_entry(self, dentry_id: int, label: str) -> bool:
        return self._run(lambda conn: self._move_entry(conn, dentry_id, label))

    def _move_entry(self, conn: Connection, dentry_id: int, label: str) -> bool:
        """Move an entry into the quarantine under the name `label` (if free)."""
        quarantine = self._quarantine(conn)
        name = label.encode()
        if self._exec(conn, "SELECT 1 FROM dentries WHERE parent_ino = :p AND name = :n",
                      p=quarantine, n=name).first():
            return False
        return self._exec(conn, "UPDATE dentries SET parent_ino = :p, name = :n"
                          " WHERE id = :id AND user_id = :uid",
                          p=quarantine, n=name, id=dentry_id).rowcount == 1

    def _quarantine(self, conn: Connection) -> int:
        """The quarantine directory, `lost+found` in the account's root, made if missing
        (mode 0700, owned like the root)."""
        row = self._exec(conn, _QUARANTINE_SQL, name=QUARANTINE, **MODE_TYPES).first()
        if row is not None:
            return row.ino
        now = time.time_ns()
        ino = self._exec(
            conn, "INSERT INTO inodes (user_id, mode, uid, gid, nlink, atime_ns, mtime_ns,"
            " ctime_ns) SELECT :uid, :mode, r.uid, r.gid, 2, :now, :now, :now"
            " FROM inodes r WHERE r.id = (SELECT root_ino FROM users WHERE id = :uid)"
            " RETURNING id", mode=stat.S_IFDIR | 0o700, now=now).scalar()
        self._exec(conn, "INSERT INTO dentries (user_id, parent_ino, name, ino) VALUES (:uid,"
                   " (SELECT root_ino FROM users WHERE id = :uid), :name, :ino)",
                   name=QUARANTINE, ino=ino)
        self._exec(conn, "UPDATE inodes SET nlink = nlink + 1, mtime_ns = :now, ctime_ns = :now"
                   " WHERE id = (SELECT root_ino FROM users WHERE id = :uid)", now=now)
        return ino

    def _make_regular_file(self, conn: Connection, ino: int) -> None:
        self._exec(conn, "UPDATE inodes SET mode = :mode WHERE id = :ino AND user_id = :uid",
                   mode=stat.S_IFREG | 0o600, ino=ino)

    def _size_to_chunks(self, conn: Connection, ino: int, chunk_size: int) -> None:
        """A file's size becomes the end of its last chunk (0 without chunks)."""
        self._exec(conn, "UPDATE inodes SET size = coalesce((SELECT fc.index * :cs + c.size"
                   " FROM file_chunks fc JOIN chunks c ON c.id = fc.chunk_id WHERE fc.ino = :ino"
                   " ORDER BY fc.index DESC LIMIT 1), 0) WHERE id = :ino AND user_id = :uid",
                   ino=ino, cs=chunk_size)

    def _quarantine_chunks(self, ino: int, first: int, chunk_size: int) -> bool:
        """Chunks from index `first` on become a file of their own in the quarantine
        (same indices, so each byte keeps its offset), named beyond-end-INO."""

        def work(conn: Connection) -> bool:
            quarantine = self._quarantine(conn)
            name = f"beyond-end-{ino}".encode()
            if self._exec(conn, "SELECT 1 FROM dentries WHERE parent_ino = :p AND name = :n",
                          p=quarantine, n=name).first():
                return False
            now = time.time_ns()
            new = self._exec(
                conn, "INSERT INTO inodes (user_id, mode, uid, gid, nlink, atime_ns, mtime_ns,"
                " ctime_ns) SELECT :uid, :mode, uid, gid, 1, :now, :now, :now FROM inodes"
                " WHERE id = :ino RETURNING id", mode=stat.S_IFREG | 0o600, now=now,
                ino=ino).scalar()
            self._exec(conn, "UPDATE file_chunks SET ino = :new WHERE ino = :ino"
                       " AND user_id = :uid AND index >= :first", new=new, ino=ino, first=first)
            self._exec(conn, "INSERT INTO dentries (user_id, parent_ino, name, ino)"
                       " VALUES (:uid, :p, :n, :new)", p=quarantine, n=name, new=new)
            for target in (ino, new):
                self._exec(conn, _RECOUNT_STORED_SQL, ino=target)
            self._size_to_chunks(conn, new, chunk_size)
            return True

        return self._run(work)

    # ---- chunk rows -----------------------------------------------------------------

    def refcounts(self) -> None:
        candidates = [row.id for row in self._query(_WRONG_REFCOUNTS_SQL, ids=None)]
        if not candidates:
            return
        for _, digest, refcount, actual in self._run(lambda conn: self._recount(conn, candidates)):
            self.report.add(
                "wrong_refcount",
                f"{self.who}: chunk {bytes(digest).hex()} has refcount {refcount}, "
                f"{actual} file chunks and holds point at it",
                repaired=self.repair,
            )

    def _recount(self, conn: Connection, chunk_ids: list[int]) -> list:
        """Confirm (and with repair, fix) refcounts holding the chunk rows' locks.

        A commit changing a chunk's file_chunks rows updates its refcount in the same
        transaction, so under the lock the count and the refcount belong together.
        """
        self._exec(conn, "SELECT id FROM chunks WHERE id = ANY(CAST(:ids AS bigint[]))"
                   " AND user_id = :uid ORDER BY id FOR UPDATE", ids=chunk_ids)
        wrong = self._exec(conn, _WRONG_REFCOUNTS_SQL, ids=chunk_ids).all()
        if self.repair and wrong:
            self._exec(
                conn,
                "UPDATE chunks c SET refcount = t.actual"
                " FROM unnest(CAST(:ids AS bigint[]), CAST(:counts AS bigint[])) AS t(id, actual)"
                " WHERE c.id = t.id AND c.user_id = :uid",
                ids=[row.id for row in wrong],
                counts=[row.actual for row in wrong],
            )
        return wrong

    def unreferenced_chunks(self) -> None:
        chunks = [
            ReclaimableChunk(chunk_id, bytes(digest))
            for chunk_id, digest in self._query(
                "SELECT id, sha256 FROM chunks c WHERE c.user_id = :uid AND deleting_by IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM file_chunks f WHERE f.chunk_id = c.id AND f.user_id = :uid)"
                " AND NOT EXISTS (SELECT 1 FROM chunk_holds h WHERE h.chunk_id = c.id)"
            )
        ]
        if not chunks:
            return
        # reclaim takes only rows whose refcount is 0: one a wrong refcount still keeps
        # stays for a run that repairs refcounts first.
        reclaimed = recovery.reclaim(self.meta, self.stores, chunks) if self.repair else 0
        chunk_ids = chunks
        self.report.add("unreferenced_chunks",
                        f"{self.who}: {len(chunk_ids)} chunk row(s) no file references",
                        found=len(chunk_ids), repaired=reclaimed)

    # ---- chunk files ----------------------------------------------------------------

    def orphan_chunks(self) -> None:
        orphans: set[bytes] = set()
        for store in (self.stores.primary, self.stores.backup):
            for batch in _batches((digest for _, digest in store.keys(self.user_id)), BATCH_SIZE):
                known = {
                    bytes(digest)
                    for (digest,) in self._query(
                        "SELECT sha256 FROM chunks WHERE user_id = :uid"
                        " AND sha256 = ANY(CAST(:digests AS bytea[]))",
                        digests=batch,
                    )
                }
                orphans.update(digest for digest in batch if digest not in known)
        for digest in sorted(orphans):
            removed = self.repair and self._remove_orphan(digest)
            self.report.add("orphan_chunks", f"{self.who}: chunk file {digest.hex()} has no metadata",
                            repaired=removed)

    def _remove_orphan(self, digest: bytes) -> bool:
        """Delete an orphan's files unless a mount has just reserved it: a row marked as
        being deleted by this session makes a reservation of the digest wait meanwhile."""
        claimed = self.meta.claim_orphans([digest])
        return recovery.delete_claimed(self.meta, self.stores, claimed) > 0

    def chunk_copies(self) -> None:
        open_damage = {
            (bytes(digest), store)
            for digest, store in self._query(
                "SELECT sha256, store FROM damage WHERE user_id = :uid AND repaired_at IS NULL"
            )
        }
        after = 0
        while rows := self._query(_REFERENCED_CHUNKS_SQL, after=after, limit=BATCH_SIZE):
            for chunk_id, digest, backup_pending in rows:
                self._check_copies(chunk_id, bytes(digest), backup_pending, open_damage)
                self.progress.tick()
            after = rows[-1].id

    def _check_copies(self, chunk_id: int, digest: bytes, backup_pending: bool,
                      open_damage: set[tuple[bytes, str]]) -> None:
        result = self.stores.verify(self.user_id, digest, self.repair)
        self.report.chunks_verified += 1
        for role in ("primary", "backup"):
            state = getattr(result, role)
            if role == "backup" and backup_pending and state == "missing":
                continue  # asynchronous backup mode: the copy is still to be made
            if state == "ok":
                if (digest, role) in open_damage:
                    self._close_damage(digest, role)
                continue
            if state == "unavailable":  # an outage: nothing is known, nothing recorded
                self.report.add("unverified_copies",
                                f"{self.who}: chunk {digest.hex()}: the {role} store does not answer")
                continue
            self._damaged_copy(result, role, state, open_damage)
        if result.lost:
            self.report.add("lost_chunks", f"{self.who}: chunk {digest.hex()} has no good copy")
            self._dangling_references(chunk_id, digest)

    def _damaged_copy(self, result: CheckResult, role: str, state: str,
                      open_damage: set[tuple[bytes, str]]) -> None:
        repaired = role in result.repaired
        self.report.add("damaged_copies",
                        f"{self.who}: chunk {result.digest.hex()}: {role} copy {state}", repaired=repaired)
        if repaired and self._close_damage(result.digest, role):
            return
        if repaired or (result.digest, role) not in open_damage:
            self.meta.record_damage(result.digest, role, state, repaired, "found by fsck")

    def _close_damage(self, digest: bytes, role: str) -> int:
        """Mark a copy's open damage records repaired; return how many there were."""
        return self._run(
            lambda conn: self._exec(
                conn,
                "UPDATE damage SET repaired_at = now() WHERE user_id = :uid AND sha256 = :digest"
                " AND store = :store AND repaired_at IS NULL",
                digest=digest,
                store=role,
            ).rowcount
        )

    def _dangling_references(self, chunk_id: int, digest: bytes) -> None:
        rows = self._query(
            "SELECT ino, count(*) FROM file_chunks WHERE chunk_id = :id AND user_id = :uid"
            " GROUP BY ino ORDER BY ino",
            id=chunk_id,
        )
        for ino, count in rows:
            self.report.add(
                "dangling_references",
                f"{self.who}: {self._describe_inode(ino)} has {count} chunk(s) pointing at "
                f"lost chunk {digest.hex()}",
                found=count,
            )

    # ---- counters -------------------------------------------------------------------

    def usage_counters(self) -> None:
        for column, (stored, actual) in self._run(self._compare_usage).items():
            self.report.add("wrong_usage", f"{self.who}: usage counter {column} is {stored}, "
                            f"a recount gives {actual}", repaired=self.repair)

    def _compare_usage(self, conn: Connection) -> dict[str, tuple[int, int]]:
        # Every change locks the usage row to update it in its own transaction: holding
        # the lock, the recount sees exactly the changes the counters include.
        stored = self._exec(conn, f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage"
                            " WHERE user_id = :uid FOR UPDATE").mappings().one()
        actual = self._exec(conn, _USAGE_RECOUNT_SQL, **MODE_TYPES).mappings().one()
        wrong = {column: (stored[column], actual[column])
                 for column in USAGE_COLUMNS if stored[column] != actual[column]}
        if self.repair and wrong:
            assignments = ", ".join(f"{column} = :{column}" for column in wrong)
            self._exec(conn, f"UPDATE usage SET {assignments} WHERE user_id = :uid",
                       **{column: actual[column] for column in wrong})
        return wrong

    # ---- helpers --------------------------------------------------------------------

    def _describe_inode(self, ino: int) -> str:
        names = self._run(lambda conn: self._exec(conn, _INODE_PATH_SQL, ino=ino).scalar())
        return f"inode {ino} ({display_path(names) if names else 'no name'})"

    def _run(self, work: Callable[[Connection], object]):
        return run_transaction(self.engine, work)

    def _exec(self, conn: Connection, sql: str, **params):
        return conn.execute(sa.text(sql), {"uid": self.user_id, **params})

    def _query(self, sql: str, **params) -> list:
        return self._run(lambda conn: self._exec(conn, sql, **params).all())


def _batches(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
