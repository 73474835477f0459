"""FileSystem: one user's namespace as a file system, over a MetadataStore and a chunk store.

Runs on the trio loop. Metadata transactions and chunk I/O (with hashing) run in worker
threads under bounded limiters, so the loop never blocks. Writes land in per-chunk
buffers under a global memory budget; a full chunk is hashed and stored at once in the
background, and buffered chunks are committed to the metadata in one transaction per
batch (on flush/fsync/close, on budget pressure, per batch of full chunks, on a timer).
"""

import hashlib
import logging
import os
import stat as stat_module
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, replace
from functools import partial

import trio

from dfsfs.chunks.base import ChunkStore
from dfsfs.core.caches import ReadCache, WriteBudget
from dfsfs.errors import (
    DfsfsError,
    InvalidArgumentError,
    IsDirectoryError,
    MetadataUnavailableError,
    NameTooLongError,
    NoAttributeError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    QuotaExceededError,
    StorageError,
)
from dfsfs.meta.store import (
    Attrs,
    ChunkRef,
    MetadataStore,
    QueuedRemoval,
    ReclaimableChunk,
    Removal,
    Usage,
)

log = logging.getLogger(__name__)

NAME_MAX = 255
PATH_MAX = 4096
XATTR_SIZE_MAX = 65536
UNSUPPORTED_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
MAP_AT_OPEN_CHUNKS = 64  # files up to this many chunks get their chunk map with their attrs
CAPABILITY_XATTR = b"security.capability"  # asked for by the kernel before writes
RECLAIM_GATHER_S = 0.2  # freed chunks are gathered this long into one reclaim
RECLAIM_BATCH = 512  # chunks per reclaim transaction
RECLAIM_BATCHES_WAITING = 32  # reclaim at once when this many batches have gathered
UNLINK_BATCH = 256  # queued removals per metadata call
UNLINK_QUEUE_MAX = 4096  # an unlink waits for the queue to drain beyond this
UNLINK_RETRY_S = 1.0  # after a failed batch (the database away)


@dataclass(frozen=True)
class CoreSettings:
    chunk_size: int = 1 << 20
    write_buffer_bytes: int = 64 << 20
    read_cache_bytes: int = 128 << 20
    readahead_chunks: int = 4
    commit_batch_bytes: int = 32 << 20  # commit full chunks in batches of this size
    flush_interval_s: float = 5.0  # commit buffered writes idle this long
    statfs_cache_s: float = 2.0
    metadata_timeout_s: float = 8.0  # then EIO: a frozen database must not hang callers
    attr_cache_s: float = 1.0  # as long as the kernel's own attribute cache
    missing_xattr_cache_s: float = 1.0  # the kernel asks for security.capability before every write
    thread_limit: int = 8


@dataclass(frozen=True)
class Capacity:
    """What statfs reports: the user's quota and use, or the chunk store's space."""

    total_bytes: int
    free_bytes: int
    total_inodes: int
    free_inodes: int


class PendingChunk:
    """A sealed chunk buffer: being stored, or stored and waiting for its commit."""

    __slots__ = ("data", "ref", "error", "done", "storing")

    def __init__(self, data: bytes | bytearray):
        self.data = data
        self.ref: ChunkRef | None = None  # None with no error: an all-zero chunk (a hole)
        self.error: BaseException | None = None
        self.done = trio.Event()
        self.storing = False  # stored in the background; else by the commit that takes it


class FileState:
    """The in-memory state of a file that is open or has uncommitted writes."""

    def __init__(self, attrs: Attrs):
        self.ino = attrs.ino
        self.attrs = attrs  # as last read or changed by this mount; serves getattr while open
        self.size = attrs.size  # logical size including buffered writes
        self.committed_size = attrs.size
        self.mtime_ns: int | None = None  # set by buffered writes (or utimens) until committed
        self.ctime_ns: int | None = None  # of the last write or attribute change not committed
        self.changed_attrs: dict[str, int] = {}  # mode, uid, gid, atime_ns: see `fold`
        self.dirty: dict[int, bytearray] = {}
        self.pending: dict[int, PendingChunk] = {}
        self.chunk_map: dict[int, ChunkRef] | None = None
        self.open_handles = 0
        self.unlinked = False
        self.lock = trio.Lock()  # serialises writes (which may await old chunk content)
        self.commit_lock = trio.Lock()  # serialises commits, so they land in order
        self.write_seq = 0  # counts writes, to tell whether a commit saw the latest
        self.last_write = 0.0
        self.last_read_end = -1
        self.error: BaseException | None = None  # a background commit failure, reported later
        self.commit_scheduled = False
        self.accounted_bytes = 0  # buffered bytes charged to the write budget

    @property
    def has_uncommitted(self) -> bool:
        return bool(self.dirty or self.pending or self.mtime_ns is not None or self.changed_attrs)

    def fold(self, changes: dict[str, int], now_ns: int) -> None:
        """An attribute change while writes are buffered: it is committed with them, in
        one durable commit (tar sets times, owner and mode of each file before closing)."""
        changes = dict(changes)
        if "mtime_ns" in changes:
            self.mtime_ns = changes.pop("mtime_ns")  # a later write moves it on again
        self.changed_attrs.update(changes)
        self.ctime_ns = now_ns
        self.write_seq += 1

    def uncommitted_changes(self) -> dict[str, int]:
        changes = dict(self.changed_attrs)
        if self.mtime_ns is not None:
            changes["mtime_ns"] = self.mtime_ns
        if self.ctime_ns is not None:
            changes["ctime_ns"] = self.ctime_ns
        return changes

    def forget_committed(self, changes: dict[str, int], saw_latest: bool) -> None:
        for name, value in changes.items():
            if self.changed_attrs.get(name) == value:
                del self.changed_attrs[name]
        if saw_latest:
            self.mtime_ns = self.ctime_ns = None

    @property
    def pending_bytes(self) -> int:
        return sum(len(p.data) for p in self.pending.values())


@dataclass
class Handle:
    state: FileState
    flags: int


class DirHandle:
    """An open directory: the last page of entries read from the database."""

    def __init__(self, ino: int):
        self.ino = ino
        self.page_after = 0  # the page holds the entries after this id ...
        self.page: list[tuple[int, bytes, Attrs]] = []  # ... in id order
        self.complete = False  # ... and every entry up to the end

    def serve(self, after_id: int, limit: int) -> list[tuple[int, bytes, Attrs]] | None:
        """Entries after `after_id` from the page, or None if the database must be asked."""
        last_id = self.page[-1][0] if self.page else self.page_after
        if after_id == 0 or not self.page_after <= after_id <= last_id:
            return None  # (from 0: a new listing, or rewinddir, which must see changes)
        rest = [entry for entry in self.page if entry[0] > after_id]
        if not rest and not self.complete:
            return None
        return rest[:limit]

    def fetched(self, after_id: int, entries: list, complete: bool) -> None:
        self.page_after, self.page, self.complete = after_id, entries, complete


class FileSystem:
    """The core of one mounted namespace. `ino` values are the metadata store's inode ids."""

    def __init__(
        self,
        meta: MetadataStore,
        store: ChunkStore,
        settings: CoreSettings,
        capacity_probe: Callable[[], tuple[int, int]] | None = None,
    ):
        self.meta = meta
        self.store = store
        self.settings = settings
        self.namespace = meta.user_id
        self.root_ino = meta.root_ino
        self.capacity_probe = capacity_probe  # (total, free) bytes of the chunk store
        self.budget = WriteBudget(settings.write_buffer_bytes)
        self.cache = ReadCache(settings.read_cache_bytes)
        self.meta_limiter = trio.CapacityLimiter(settings.thread_limit)
        self.chunk_limiter = trio.CapacityLimiter(settings.thread_limit)
        self._states: dict[int, FileState] = {}
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._fetching: dict[bytes, trio.Event] = {}
        self._usage: tuple[float, Usage] | None = None
        self._missing_xattrs: dict[tuple[int, bytes], float] = {}  # (ino, name) -> expiry
        self._recent_attrs: dict[int, tuple[float, Attrs]] = {}  # ino -> (expiry, attrs)
        self._versions: dict[int, tuple[int, int]] = {}  # ino -> (mtime_ns, size) last seen
        self._reclaimable: list[ReclaimableChunk] = []  # chunks to delete, gathered in batches
        self._reclaim_wanted = trio.Event()
        self._reclaiming = trio.Lock()
        self._nursery: trio.Nursery | None = None
        # Names removed by unlink and not yet in the database, in order (see unlink).
        self._unlinks: dict[tuple[int, bytes], QueuedRemoval] = {}
        self._unlinks_wanted = trio.Event()
        self._applying_unlinks = trio.Lock()
        self._metadata_reachable = True  # the last metadata call got an answer
        self._zeros = bytes(settings.chunk_size)
        # Store the chunks a commit seals while its metadata transaction runs.
        self._store_helpers = futures.ThreadPoolExecutor(settings.thread_limit,
                                                         thread_name_prefix="commit-store")

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run background work (uploads, readahead, the flusher) until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._reclaimer)
                nursery.start_soon(self._unlinker)
                task_status.started()
        finally:
            self._store_helpers.shutdown(wait=False)

    async def flush_all(self) -> None:
        """Commit every buffered write and queued removal (unmount, SIGTERM)."""
        try:
            await self._apply_unlinks()
        except DfsfsError as error:
            log.error("%d removals could not reach the database and are lost: %s",
                      len(self._unlinks), error)
        for state in list(self._states.values()):
            try:
                await self._commit(state)
            except DfsfsError as error:  # one file's failure must not cost the others theirs
                log.error("inode %d: buffered writes could not be committed: %s", state.ino, error)
        await self._reclaim_pending()

    async def _meta(self, function, *args, **kwargs):
        """A metadata call in a worker thread, failing (EIO) if the database does not answer
        in time: a frozen server must not hang the file system. An abandoned call may
        still complete later; each is one transaction, so it lands whole or not at all."""
        with trio.move_on_after(self.settings.metadata_timeout_s):
            try:
                result = await trio.to_thread.run_sync(
                    partial(function, *args, **kwargs), limiter=self.meta_limiter,
                    abandon_on_cancel=True,
                )
            except MetadataUnavailableError:
                self._metadata_reachable = False
                raise
            self._metadata_reachable = True
            return result
        self._metadata_reachable = False
        raise MetadataUnavailableError(
            f"the metadata database did not answer within {self.settings.metadata_timeout_s:g} s")

    async def _chunks(self, function, *args):
        return await trio.to_thread.run_sync(partial(function, *args), limiter=self.chunk_limiter)

    # ---- names and attributes ----------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes) -> Attrs:
        _check_name(name)
        if (parent_ino, name) in self._unlinks:
            raise NotFoundError("no such entry")
        return self._overlay(await self._settled_attrs(self.meta.lookup, parent_ino, name))

    async def getattr(self, ino: int) -> Attrs:
        state = self._states.get(ino)
        if state is not None and state.open_handles:
            if self._unlinks:
                await self._apply_unlinks()  # one of them may be this file's name: nlink 0
            return self._overlay(state.attrs)  # close-to-open: an open file's attrs are ours
        recent = self._recent_attrs.get(ino)
        if recent is not None and recent[0] > time.monotonic() and not self._may_lag(recent[1]):
            return recent[1]
        return self._overlay(await self._settled_attrs(self.meta.get_attrs, ino))

    async def _settled_attrs(self, query, *args) -> Attrs:
        """Attributes from the database; asked again after the queued removals when those
        may change them."""
        attrs = await self._meta(query, *args)
        if self._may_lag(attrs):
            await self._apply_unlinks()
            attrs = await self._meta(query, *args)
        return attrs

    def _may_lag(self, attrs: Attrs) -> bool:
        """Whether queued removals may change these attributes: another of its names may
        be among them (a directory's own entries are kept in step by _dir_changed)."""
        return bool(self._unlinks) and not attrs.is_dir and attrs.nlink > 1

    def _remember(self, attrs: Attrs) -> None:
        """Keep attributes as long as the kernel would: it forgets a file's after every
        write, and a directory's after every change of its entries, and asks again."""
        if len(self._recent_attrs) > 10_000:
            self._recent_attrs.clear()
        self._recent_attrs[attrs.ino] = (time.monotonic() + self.settings.attr_cache_s, attrs)

    def _dir_changed(self, ino: int, now_ns: int, nlink_delta: int = 0) -> None:
        """This mount changed a directory's entries: its kept attributes take the times
        and link count the metadata transaction just set (what a new query would say)."""
        recent = self._recent_attrs.get(ino)
        if recent is not None:
            expiry, attrs = recent
            self._recent_attrs[ino] = (expiry, replace(
                attrs, mtime_ns=now_ns, ctime_ns=now_ns, nlink=attrs.nlink + nlink_delta))

    def _overlay(self, attrs: Attrs) -> Attrs:
        """Attributes as this mount sees them: buffered writes change size and mtime."""
        state = self._states.get(attrs.ino)
        if state is None:
            self._remember(attrs)
            return attrs
        state.attrs = attrs
        if not state.has_uncommitted:
            return attrs
        mtime = state.mtime_ns if state.mtime_ns is not None else attrs.mtime_ns
        ctime = max(attrs.ctime_ns, state.ctime_ns or 0)
        return replace(attrs, size=state.size, mtime_ns=mtime, ctime_ns=ctime, **state.changed_attrs)

    async def setattr(
        self, ino: int, caller_uid: int, *, size: int | None = None, **changes: int
    ) -> Attrs:
        if size is not None:
            await self._truncate(ino, size)
            self._recent_attrs.pop(ino, None)
        owner_changes = {k: v for k, v in changes.items() if k in ("uid", "gid")}
        if owner_changes and caller_uid != 0:
            current = await self._meta(self.meta.get_attrs, ino)
            if owner_changes.get("uid", current.uid) != current.uid:
                raise PermissionDeniedError("only the owner may own files here")
        if changes:
            state = self._states.get(ino)
            if state is not None and state.has_uncommitted:
                state.fold(changes, time.time_ns())
                return self._overlay(state.attrs)
            return self._overlay(await self._meta(self.meta.set_attrs, ino, time.time_ns(), **changes))
        return await self.getattr(ino)

    def opendir(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = DirHandle(ino)
        return fh

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def readdir(self, fh: int, after_id: int, limit: int) -> list[tuple[int, bytes, Attrs]]:
        """Entries after `after_id`, at most `limit`. The kernel takes a page's worth at a
        time and asks again from where it stopped: served from the handle's last page, and
        an ended listing is not queried again."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise InvalidArgumentError("not an open directory")
        served = handle.serve(after_id, limit)
        if served is not None:
            return served
        if any(parent_ino == handle.ino for parent_ino, _ in self._unlinks):
            await self._apply_unlinks()
        rows = await self._meta(self.meta.readdir, handle.ino, after_id, limit)
        entries = [(entry_id, name, self._overlay(attrs)) for entry_id, name, attrs in rows]
        handle.fetched(after_id, entries, complete=len(entries) < limit)
        return entries

    async def readlink(self, ino: int) -> bytes:
        return await self._meta(self.meta.readlink, ino)

    # ---- namespace changes -----------------------------------------------------------------

    async def make_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
                        rdev: int = 0, target: bytes | None = None) -> Attrs:
        _check_name(name)
        if not (stat_module.S_ISREG(mode) or stat_module.S_ISDIR(mode) or stat_module.S_ISLNK(mode)
                or stat_module.S_ISFIFO(mode) or stat_module.S_ISSOCK(mode)):
            raise NotSupportedError("only files, directories, symlinks, fifos and sockets")
        if target is not None and len(target) >= PATH_MAX:
            raise NameTooLongError("symbolic link target too long")
        await self._apply_unlinks()  # the name may be one of them
        now_ns = time.time_ns()
        attrs = await self._meta(self.meta.make_node, parent_ino, name, mode, uid, gid,
                                 now_ns, rdev, target)
        self._dir_changed(parent_ino, now_ns, nlink_delta=1 if attrs.is_dir else 0)
        self._remember(attrs)
        return attrs

    async def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
                     flags: int) -> tuple[int, Attrs]:
        attrs = await self.make_node(parent_ino, name, stat_module.S_IFREG | (mode & 0o7777), uid, gid)
        self._remember_missing_xattr(attrs.ino, CAPABILITY_XATTR)  # a new file has no xattrs
        return self._open_state(attrs, flags), attrs

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attrs:
        _check_name(new_name)
        await self._apply_unlinks()
        await self._commit_if_open(ino)
        now_ns = time.time_ns()
        attrs = await self._meta(self.meta.link, ino, new_parent_ino, new_name, now_ns)
        self._dir_changed(new_parent_ino, now_ns)
        return self._overlay(attrs)

    async def unlink(self, parent_ino: int, name: bytes, *, directory: bool = False) -> None:
        """Remove a name. A file's name is queued and answered at once: removals reach the
        database in batches (rm -rf would otherwise wait for one transaction per file).
        The kernel only asks after its own lookup found a file there. Until the batch
        lands, lookups here answer that the name is gone, and every other change of the
        namespace, readdir of the directory and fsync apply the queue first; like every
        namespace change, removals are durable at the next fsync or close. A directory
        (which must be empty), and every removal while the database does not answer, go
        at the end of the next batch, and wait for it."""
        _check_name(name)
        removal = QueuedRemoval(parent_ino, name, time.time_ns(), directory)
        if not directory and self._metadata_reachable:
            if len(self._unlinks) >= UNLINK_QUEUE_MAX:
                await self._apply_unlinks()
            self._unlinks[(parent_ino, name)] = removal
            self._dir_changed(parent_ino, removal.now_ns)
            self._unlinks_wanted.set()
            return
        removed = await self._apply_unlinks(then=removal)
        self._dir_changed(parent_ino, removal.now_ns, nlink_delta=-1 if directory else 0)
        self._removed(removed)

    async def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                     new_name: bytes, flags: int) -> None:
        _check_name(old_name)
        _check_name(new_name)
        await self._apply_unlinks()
        removal = await self._meta(self.meta.rename, old_parent_ino, old_name, new_parent_ino,
                                   new_name, flags, time.time_ns(), self._open_inos())
        for parent_ino in (old_parent_ino, new_parent_ino):  # link counts moved: ask again
            self._recent_attrs.pop(parent_ino, None)
        if removal is not None:
            self._removed(removal)

    async def _unlinker(self) -> None:
        while True:
            await self._unlinks_wanted.wait()
            self._unlinks_wanted = trio.Event()
            try:
                await self._apply_unlinks()
            except DfsfsError as error:
                log.warning("%d removals not in the database yet (retrying): %s",
                            len(self._unlinks), error)
                await trio.sleep(UNLINK_RETRY_S)
                self._unlinks_wanted.set()

    async def _apply_unlinks(self, then: QueuedRemoval | None = None) -> Removal | None:
        """Write the queued removals to the database, in batches, and wait for them. `then`
        goes last, in the same call as the last of them; its outcome is returned (or raised)."""
        async with self._applying_unlinks:
            while self._unlinks or then is not None:
                batch = list(self._unlinks.values())[:UNLINK_BATCH]
                last = None
                if then is not None and len(batch) < UNLINK_BATCH:
                    last, then = then, None
                    batch.append(last)
                results = await self._meta(self.meta.unlink_each, batch, self._open_inos())
                for removal, result in zip(batch, results, strict=True):
                    if removal is last:
                        if isinstance(result, DfsfsError):
                            raise result
                        return result
                    del self._unlinks[(removal.parent_ino, removal.name)]
                    if isinstance(result, DfsfsError):
                        # Gone meanwhile, or replaced: the kernel saw a file there.
                        log.info("queued removal of %r in directory %d: %s",
                                 removal.name, removal.parent_ino, result)
                        continue
                    self._removed(result)
            return None

    def _open_inos(self) -> frozenset[int]:
        return frozenset(ino for ino, state in self._states.items() if state.open_handles)

    def _removed(self, removal: Removal) -> None:
        """After a name went away: forget a purged inode; an open one goes at its last close."""
        self._recent_attrs.pop(removal.attrs.ino, None)
        if removal.attrs.nlink == 0:
            self._count_growth(-removal.attrs.size)
        state = self._states.get(removal.attrs.ino)
        if state is not None:
            state.attrs = removal.attrs
        if removal.purged:
            if state is not None:
                self._states.pop(removal.attrs.ino)
                self._drop_buffers(state)
            self._reclaim_soon(removal.reclaimable)
        elif removal.attrs.nlink == 0 and state is not None:
            state.unlinked = True
        else:
            self._remember(removal.attrs)

    async def _purge(self, ino: int) -> None:
        state = self._states.pop(ino, None)
        if state is not None:
            self._drop_buffers(state)
        self._reclaim_soon(await self._meta(self.meta.purge, ino))

    # ---- open files ------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; also says whether what the kernel cached of it is still current."""
        state = self._states.get(ino)
        current = True
        if state is None or not state.has_uncommitted:
            # Close-to-open: what other mounts committed is visible to the next open.
            attrs, chunk_map = await self._meta(self.meta.open_file, ino, MAP_AT_OPEN_CHUNKS *
                                                self.settings.chunk_size)
            if stat_module.S_ISDIR(attrs.mode):
                raise IsDirectoryError("is a directory")
            current = self._seen_version(attrs)
            state = self._states.get(ino)
            if state is None:
                state = self._states[ino] = FileState(attrs)
            if not state.has_uncommitted:
                state.attrs = attrs
                state.size = state.committed_size = attrs.size
                state.chunk_map = chunk_map
        fh = self._add_handle(state, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            try:
                await self._truncate(ino, 0)  # the kernel hands O_TRUNC to us (atomic_o_trunc)
            except BaseException:
                await self.release(fh)
                raise
        return fh, current

    def _seen_version(self, attrs: Attrs) -> bool:
        """Record the file's committed version; False if it changed since this mount saw it
        (another mount wrote it): the kernel's cached pages and size are then stale."""
        version = (attrs.mtime_ns, attrs.size)
        if len(self._versions) > 100_000:
            self._versions.clear()
        previous = self._versions.get(attrs.ino)
        self._versions[attrs.ino] = version
        return previous == version

    def _open_state(self, attrs: Attrs, flags: int) -> int:
        state = self._states.get(attrs.ino)
        if state is None:
            state = self._states[attrs.ino] = FileState(attrs)
            state.chunk_map = {} if attrs.size == 0 else None
        return self._add_handle(state, flags)

    def _add_handle(self, state: FileState, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(state, flags)
        state.open_handles += 1
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise InvalidArgumentError(f"no open file handle {fh}") from None

    async def flush(self, fh: int) -> None:
        """close(2) and fsync(2): data and metadata are durable when this returns."""
        await self._commit(self._handle(fh).state)
        await self.make_durable()

    async def make_durable(self) -> None:
        """fsyncdir, and close/fsync of a file with nothing to commit: namespace changes
        commit without waiting for the disk until here."""
        await self._apply_unlinks()
        if self.meta.has_relaxed_commits:
            await self._meta(self.meta.make_durable)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        state = handle.state
        state.open_handles -= 1
        if state.open_handles:
            return
        if state.unlinked:
            await self._purge(state.ino)
            return
        try:
            await self._commit(state)
        except DfsfsError as error:
            # The last close already reported this; nothing is left to retry the writes.
            log.warning("inode %d closed with uncommitted writes, dropped: %s", state.ino, error)
            self._drop_buffers(state)
        finally:
            if not state.open_handles and not state.has_uncommitted:
                self._states.pop(state.ino, None)
                self._remember(state.attrs)

    async def _commit_if_open(self, ino: int) -> None:
        state = self._states.get(ino)
        if state is not None:
            await self._commit(state)

    # ---- writing ------------------------------------------------------------------------------

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        state = self._handle(fh).state
        self._raise_deferred_error(state)
        await self._check_byte_quota(state, offset + len(data))
        await self.budget.reserve(len(data))  # back-pressure before taking memory
        try:
            async with state.lock:
                await self._write_locked(state, offset, data)
        finally:
            self.budget.release(len(data))
            self._account(state)
        if state.pending_bytes >= self.settings.commit_batch_bytes:
            self._schedule_commit(state, stored_only=True)
        return len(data)

    def _buffered(self, state: FileState) -> int:
        return sum(len(b) for b in state.dirty.values()) + state.pending_bytes

    async def _check_byte_quota(self, state: FileState, new_end: int) -> None:
        """Refuse growth past the quota at write() already (the commit checks it exactly)."""
        if new_end <= state.size:
            return
        usage = await self.usage()
        growth = new_end - state.committed_size
        if usage.quota_bytes is not None and usage.logical_bytes + growth > usage.quota_bytes:
            raise QuotaExceededError("byte quota exceeded")

    def _account(self, state: FileState) -> None:
        """Charge the budget with what `state` buffers now: the one place it changes."""
        buffered = self._buffered(state)
        change = buffered - state.accounted_bytes
        state.accounted_bytes = buffered
        if change > 0:
            self.budget.used_bytes += change
        elif change < 0:
            self.budget.release(-change)

    async def _write_locked(self, state: FileState, offset: int, data: bytes) -> None:
        chunk_size = self.settings.chunk_size
        view = memoryview(data)
        position = offset
        while view:
            index, chunk_offset = divmod(position, chunk_size)
            piece = view[: chunk_size - chunk_offset]
            buffer = state.dirty.get(index)
            if buffer is None and chunk_offset == 0 and len(piece) == chunk_size:
                # A whole chunk (the usual streaming write): no copy, straight to storage.
                self._seal_data(state, index, data if len(data) == chunk_size else bytes(piece))
                position += chunk_size
                view = view[chunk_size:]
                continue
            if buffer is None:
                buffer = await self._start_buffer(state, index, chunk_offset, len(piece))
            if chunk_offset > len(buffer):
                buffer.extend(bytes(chunk_offset - len(buffer)))
            buffer[chunk_offset : chunk_offset + len(piece)] = piece
            if len(buffer) == chunk_size:
                self._seal(state, index)
            position += len(piece)
            view = view[len(piece):]
        state.size = max(state.size, offset + len(data))
        state.write_seq += 1
        state.mtime_ns = state.ctime_ns = time.time_ns()
        state.last_write = time.monotonic()

    async def _start_buffer(self, state: FileState, index: int, chunk_offset: int,
                            length: int) -> bytearray:
        """A chunk buffer holding the chunk's current content where the write won't cover it."""
        chunk_start = index * self.settings.chunk_size
        extent = min(self.settings.chunk_size, max(0, state.size - chunk_start))
        if chunk_offset == 0 and length >= extent:
            buffer = bytearray()
        else:
            buffer = bytearray(await self._chunk_content(state, index))
            if len(buffer) < extent:
                buffer.extend(bytes(extent - len(buffer)))
        state.dirty[index] = buffer
        return buffer

    def _seal(self, state: FileState, index: int) -> None:
        self._seal_data(state, index, state.dirty.pop(index))

    def _seal_data(self, state: FileState, index: int, data: bytes | bytearray) -> None:
        """Hand a chunk's bytes to the background: hash and store them now, commit later."""
        pending = state.pending[index] = PendingChunk(data)  # replaces an older version
        pending.storing = True
        self._nursery.start_soon(self._store_pending, pending)

    async def _store_pending(self, pending: PendingChunk) -> None:
        try:
            pending.ref = await self._chunks(self._store_chunk, pending.data)
        except BaseException as error:  # noqa: BLE001 - reported by the commit that needs it
            pending.error = error
        finally:
            pending.done.set()

    def _store_chunk(self, data: bytes | bytearray) -> ChunkRef | None:
        """Worker thread: hash and store one chunk; an all-zero chunk becomes a hole."""
        ref = self._chunk_ref(data)
        if ref is not None:
            self.store.put(self.namespace, ref.digest, data)
        return ref

    def _chunk_ref(self, data: bytes | bytearray) -> ChunkRef | None:
        if self._is_zeros(data):
            return None
        return ChunkRef(hashlib.sha256(data).digest(), len(data))

    def _is_zeros(self, data: bytes | bytearray) -> bool:
        if not data or data[0] or data[-1] or data[len(data) // 2]:
            return not data
        return data == self._zeros[: len(data)]

    def _schedule_commit(self, state: FileState, stored_only: bool = False) -> None:
        if not state.commit_scheduled:
            state.commit_scheduled = True
            self._nursery.start_soon(self._commit_in_background, state, stored_only)

    async def _commit_in_background(self, state: FileState, stored_only: bool) -> None:
        try:
            await self._commit(state, stored_only=stored_only)
        except DfsfsError as error:
            log.warning("background commit of inode %d failed: %s", state.ino, error)
            if not state.has_uncommitted:
                state.error = error  # writes were lost: the file's next flush must say so
            # otherwise the writes stay buffered and a later commit retries them
        finally:
            state.commit_scheduled = False

    def _raise_deferred_error(self, state: FileState) -> None:
        if state.error is not None:
            error, state.error = state.error, None
            raise error

    async def _commit(self, state: FileState, stored_only: bool = False) -> None:
        """Make buffered writes of `state` durable and visible.

        By default everything written so far (flush, fsync, close). With `stored_only`,
        only chunks already stored, without waiting: a streaming writer's batches then
        commit behind it, as a growing prefix of the file, while it goes on writing.
        """
        async with state.commit_lock:
            self._raise_deferred_error(state)
            if not state.has_uncommitted:
                return
            seen_seq = state.write_seq
            if stored_only:
                batch, size = self._stored_prefix(state)
            else:
                for index in list(state.dirty):  # stored by this commit itself: see _commit_chunks
                    state.pending[index] = PendingChunk(state.dirty.pop(index))
                batch = dict(state.pending)
                size = state.size
            changes = state.uncommitted_changes()
            await self._commit_batch(state, batch, size, changes)
            state.forget_committed(changes, saw_latest=state.write_seq == seen_seq
                                   and not state.dirty and not state.pending)

    def _stored_prefix(self, state: FileState) -> tuple[dict[int, PendingChunk], int]:
        """Stored chunks below the first one still buffered or being stored, and the size
        they reach: a crash then leaves a prefix of what was written, never a gap."""
        unfinished = [i for i, p in state.pending.items() if not p.done.is_set() or p.error]
        first_unfinished = min(unfinished + list(state.dirty), default=None)
        batch = {i: p for i, p in state.pending.items()
                 if p.done.is_set() and p.error is None
                 and (first_unfinished is None or i < first_unfinished)}
        reached = [i * self.settings.chunk_size + len(p.data) for i, p in batch.items()]
        return batch, min(state.size, max([state.committed_size, *reached]))

    async def _commit_batch(self, state: FileState, batch: dict[int, PendingChunk], size: int,
                            changes: dict[str, int]) -> None:
        stored = {index: p for index, p in batch.items() if p.storing}
        for pending in stored.values():
            await pending.done.wait()
        failed = [p.error for p in stored.values() if p.error is not None]
        if failed:
            self._drop_buffers(state)
            raise _as_storage_error(failed[0])
        chunks = {index: (p.ref, p.data) for index, p in stored.items()}
        unstored = {index: p.data for index, p in batch.items() if not p.storing}
        try:
            await self._commit_chunks(state, chunks, size, changes, unstored=unstored)
        except _StoreFailed as failure:
            self._drop_buffers(state)
            raise _as_storage_error(failure.error) from None
        for index, pending in batch.items():
            if state.pending.get(index) is pending:  # not replaced by a newer version meanwhile
                del state.pending[index]
        self._account(state)

    async def _commit_chunks(self, state: FileState, chunks: dict, size: int,
                             changes: dict[str, int], drop_from_index: int | None = None,
                             unstored: dict[int, bytes | bytearray] | None = None) -> None:
        """Reference stored chunks, and `unstored` ones stored meanwhile, in one metadata
        transaction that commits only when all of them are durable."""
        refs = {index: ref for index, (ref, _) in chunks.items()}
        data_by_digest = {ref.digest: data for ref, data in chunks.values() if ref is not None}
        new_refs, reclaimable = await self._meta(
            self._store_and_commit, state.ino, refs, data_by_digest, unstored or {}, size,
            changes, drop_from_index,
        )
        refs.update(new_refs)
        if state.chunk_map is not None:
            if drop_from_index is not None:
                for index in [i for i in state.chunk_map if i >= drop_from_index]:
                    del state.chunk_map[index]
            for index, ref in refs.items():
                if ref is None:
                    state.chunk_map.pop(index, None)
                else:
                    state.chunk_map[index] = ref
        self._count_growth(size - state.committed_size)
        state.committed_size = size
        state.attrs = replace(state.attrs, size=size, **changes)
        self._versions[state.ino] = (state.attrs.mtime_ns, size)  # our pages match our writes
        self._reclaim_soon(reclaimable)

    def _store_and_commit(self, ino: int, refs: dict, data_by_digest: dict,
                          unstored: dict[int, bytes | bytearray], size: int,
                          changes: dict[str, int], drop_from_index: int | None):
        """Worker thread. The unstored chunks are hashed here, then stored (and the stores
        synced) by a helper thread while the metadata transaction references them; it
        commits only once they are durable (invariant 1). A small file's close then waits
        for the disk and the database side by side instead of one after the other."""
        new_refs = {index: self._chunk_ref(data) for index, data in unstored.items()}
        to_store = {ref.digest: unstored[index] for index, ref in new_refs.items() if ref}
        data_by_digest = {**data_by_digest, **to_store}
        storing = self._store_helpers.submit(self._put_and_sync, to_store)

        def before_commit(unreferenced: list[bytes]) -> None:
            try:
                storing.result()
            except BaseException as error:  # noqa: BLE001 - the commit must not happen
                raise _StoreFailed(error) from error
            self._ensure_stored(data_by_digest, unreferenced)

        try:
            reclaimable = self.meta.commit_file(ino, {**refs, **new_refs}, size, changes,
                                                drop_from_index, before_commit)
        finally:
            futures.wait([storing])  # never leave a put running unseen
        return new_refs, reclaimable

    def _put_and_sync(self, data_by_digest: dict[bytes, bytes | bytearray]) -> None:
        for digest, data in data_by_digest.items():
            self.store.put(self.namespace, digest, data)
        self.store.sync()  # also what background puts of this file left to sync

    def _ensure_stored(self, data_by_digest: dict[bytes, bytearray], digests: list[bytes]) -> None:
        """Worker thread, inside the commit: re-store chunks a concurrent reclaim removed."""
        missing = [digest for digest in digests if not self.store.has(self.namespace, digest)]
        for digest in missing:
            self.store.put(self.namespace, digest, data_by_digest[digest])
        if missing:
            self.store.sync()

    def _drop_buffers(self, state: FileState) -> None:
        state.dirty.clear()
        state.pending.clear()
        state.mtime_ns = state.ctime_ns = None
        state.changed_attrs.clear()
        state.size = state.committed_size
        self._account(state)

    def _reclaim_soon(self, chunks: list[ReclaimableChunk]) -> None:
        """Free chunk bytes in the background: nobody waits for space to come back."""
        if chunks:
            self._reclaimable.extend(chunks)
            self._reclaim_wanted.set()

    async def _reclaimer(self) -> None:
        """Delete freed chunks once removals pause (or many have gathered): while rm -rf
        runs, its own work comes first on a small machine, and one durable flush serves a
        whole batch."""
        while True:
            await self._reclaim_wanted.wait()
            gathered = -1
            while gathered < len(self._reclaimable) < RECLAIM_BATCH * RECLAIM_BATCHES_WAITING:
                gathered = len(self._reclaimable)
                await trio.sleep(RECLAIM_GATHER_S)
            await self._reclaim_pending()

    async def _reclaim_pending(self) -> None:
        async with self._reclaiming:  # unmount waits for a batch under way
            self._reclaim_wanted = trio.Event()
            chunks, self._reclaimable = self._reclaimable, []
            for start in range(0, len(chunks), RECLAIM_BATCH):
                await self._reclaim(chunks[start:start + RECLAIM_BATCH])

    async def _reclaim(self, chunks: list[ReclaimableChunk]) -> None:
        """Delete the bytes of chunks whose last reference is gone (after that commit)."""
        try:
            await self._meta(self.meta.reclaim, [c.id for c in chunks], self._delete_chunks)
        except DfsfsError as error:
            log.warning("could not reclaim %d chunks now (fsck will): %s", len(chunks), error)
        for chunk in chunks:
            self.cache.discard(chunk.digest)

    def _delete_chunks(self, digests: list[bytes]) -> None:
        for digest in digests:
            self.store.delete(self.namespace, digest)

    async def _truncate(self, ino: int, new_size: int) -> None:
        if new_size < 0:
            raise InvalidArgumentError("negative size")
        state = self._states.get(ino)
        temporary = state is None
        if temporary:
            state = FileState(await self._meta(self.meta.get_attrs, ino))
            self._states[ino] = state
        try:
            async with state.lock:
                await self._commit(state)
                async with state.commit_lock:
                    await self._truncate_committed(state, new_size)
        finally:
            if temporary and not state.open_handles:
                self._states.pop(ino, None)

    async def _truncate_committed(self, state: FileState, new_size: int) -> None:
        chunk_size = self.settings.chunk_size
        boundary, remainder = divmod(new_size, chunk_size)
        chunks = {}
        drop_from = None
        if new_size < state.committed_size:
            drop_from = boundary + (1 if remainder else 0)
            if remainder:
                content = await self._chunk_content(state, boundary)
                if len(content) > remainder:
                    kept = bytearray(content[:remainder])
                    chunks[boundary] = (await self._chunks(self._store_chunk, kept), kept)
        now_ns = time.time_ns()
        await self._commit_chunks(state, chunks, new_size, {"mtime_ns": now_ns, "ctime_ns": now_ns},
                                  drop_from)
        state.size = new_size

    # ---- reading ---------------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        state = self._handle(fh).state
        end = min(offset + length, state.size)
        if offset >= end:
            return b""
        chunk_size = self.settings.chunk_size
        pieces = []
        for index in range(offset // chunk_size, (end - 1) // chunk_size + 1):
            chunk_start = index * chunk_size
            low = max(offset, chunk_start) - chunk_start
            high = min(end, chunk_start + chunk_size) - chunk_start
            content = await self._chunk_content(state, index)
            piece = content[low:high]
            if len(piece) < high - low:
                piece = bytes(piece) + bytes(high - low - len(piece))
            pieces.append(piece)
        if offset == state.last_read_end or offset == 0:
            self._read_ahead(state, end)
        state.last_read_end = end
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _chunk_content(self, state: FileState, index: int):
        """A chunk's current bytes (buffered, else stored and verified); b'' for a hole."""
        buffer = state.dirty.get(index)
        if buffer is not None:
            return buffer
        pending = state.pending.get(index)
        if pending is not None:
            return pending.data
        ref = (await self._chunk_map(state)).get(index)
        if ref is None:
            return b""
        return await self._fetch(ref.digest)

    async def _chunk_map(self, state: FileState) -> dict[int, ChunkRef]:
        if state.chunk_map is None:
            state.chunk_map = await self._meta(self.meta.chunk_map, state.ino)
        return state.chunk_map

    async def _fetch(self, digest: bytes) -> bytes:
        while True:
            data = self.cache.get(digest)
            if data is not None:
                return data
            fetching = self._fetching.get(digest)
            if fetching is None:
                break
            await fetching.wait()
        done = self._fetching[digest] = trio.Event()
        try:
            data = await self._chunks(self.store.get, self.namespace, digest)
            self.cache.put(digest, data)
            return data
        finally:
            del self._fetching[digest]
            done.set()

    def _read_ahead(self, state: FileState, end: int) -> None:
        if state.chunk_map is None or self._nursery is None:
            return
        first = end // self.settings.chunk_size
        for index in range(first, first + self.settings.readahead_chunks + 1):
            ref = state.chunk_map.get(index)
            if ref is not None and ref.digest not in self._fetching and self.cache.get(ref.digest) is None:
                self._nursery.start_soon(self._prefetch, ref.digest)

    async def _prefetch(self, digest: bytes) -> None:
        try:
            await self._fetch(digest)
        except DfsfsError as error:
            log.info("readahead failed (the read itself will report it): %s", error)

    # ---- extended attributes ---------------------------------------------------------------

    async def get_xattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        key = (ino, name)
        if self._missing_xattrs.get(key, 0.0) > time.monotonic():
            raise NoAttributeError("no such attribute")
        try:
            return await self._meta(self.meta.get_xattr, ino, name)
        except NoAttributeError:
            self._remember_missing_xattr(ino, name)
            raise

    def _remember_missing_xattr(self, ino: int, name: bytes) -> None:
        if len(self._missing_xattrs) > 10_000:
            self._missing_xattrs.clear()
        self._missing_xattrs[(ino, name)] = time.monotonic() + self.settings.missing_xattr_cache_s

    async def list_xattrs(self, ino: int) -> list[bytes]:
        return await self._meta(self.meta.list_xattrs, ino)

    async def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        _check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise InvalidArgumentError("attribute value too large")
        self._missing_xattrs.pop((ino, name), None)
        self._recent_attrs.pop(ino, None)  # ctime changes
        await self._meta(self.meta.set_xattr, ino, name, value, flags, time.time_ns())

    async def remove_xattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        self._recent_attrs.pop(ino, None)
        await self._meta(self.meta.remove_xattr, ino, name, time.time_ns())

    # ---- usage -----------------------------------------------------------------------------------

    async def usage(self) -> Usage:
        """The user's usage counters, cached briefly: file managers call statfs often."""
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > self.settings.statfs_cache_s:
            self._usage = (now, await self._meta(self.meta.usage))
        return self._usage[1]

    def _count_growth(self, growth: int) -> None:
        """Keep the cached usage in step with this mount's own commits (quota checks)."""
        if self._usage is not None and growth:
            cached_at, usage = self._usage
            self._usage = (cached_at, replace(usage, logical_bytes=usage.logical_bytes + growth))

    async def capacity(self) -> Capacity:
        usage = await self.usage()
        store_total, store_free = (
            await trio.to_thread.run_sync(self.capacity_probe) if self.capacity_probe else (0, 0)
        )
        if usage.quota_bytes is not None:
            total = usage.quota_bytes
            free = max(0, min(total - usage.logical_bytes, store_free or total))
        else:
            total, free = store_total, store_free
        if usage.quota_inodes is not None:
            total_inodes = usage.quota_inodes
        else:
            total_inodes = max(usage.inodes + 1_000_000, 2 * usage.inodes)
        return Capacity(total, free, total_inodes, max(0, total_inodes - usage.inodes))

    # ---- the flusher ----------------------------------------------------------------------------

    async def _flusher(self) -> None:
        """Commit writes that sat idle too long, and everything when memory runs short."""
        while True:
            with trio.move_on_after(1.0):
                await self.budget.pressure.wait()
            pressure = self.budget.pressure.is_set()
            if pressure:
                self.budget.pressure = trio.Event()
            now = time.monotonic()
            for state in sorted(self._states.values(), key=lambda s: -s.pending_bytes):
                idle = now - state.last_write > self.settings.flush_interval_s
                if state.has_uncommitted and (pressure or idle):
                    self._schedule_commit(state)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLongError("file name longer than 255 bytes")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidArgumentError("invalid file name")


def _check_xattr_name(name: bytes) -> None:
    if name in UNSUPPORTED_XATTRS:
        raise NotSupportedError("POSIX ACLs are not supported")
    if not name or len(name) > NAME_MAX:
        raise InvalidArgumentError("invalid attribute name")


class _StoreFailed(Exception):
    """Storing a chunk failed inside a commit (which then did not happen)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _as_storage_error(error: BaseException) -> DfsfsError:
    if isinstance(error, DfsfsError):
        return error
    if isinstance(error, OSError):
        return StorageError(f"chunk store: {os.strerror(error.errno or 5)}")
    return StorageError(f"chunk store: {error}")
