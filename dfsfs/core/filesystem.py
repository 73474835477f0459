"""FileSystem: one account's namespace as a file system, for one mount.

A facade over the concerns that live in their own modules: attributes (attrs), handles,
file write state (write_buffer), storing, committing and sync points (committer),
reading (reader), removals, releases and reclaim (removals), the kernel's references
(inodes), damage records (damage). Runs on the trio loop; metadata calls and chunk I/O
run in bounded worker threads (offload). Durability as ARCHITECTURE.md decides it: see
core/committer.py.
"""

import logging
import os
import stat as stat_module
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from dfsfs import recovery
from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.core.attrs import AttrView
from dfsfs.core.caches import TTLCache, WriteBudget
from dfsfs.core.committer import Committer
from dfsfs.core.damage import DamageLog
from dfsfs.core.handles import HandleTable
from dfsfs.core.inodes import InodeTable
from dfsfs.core.listings import KnownListings
from dfsfs.core.offload import Offload, supervised
from dfsfs.core.reader import Reader
from dfsfs.core.removals import InodeReleaser, Reclaimer, RemovalQueue
from dfsfs.core.settings import (
    MAX_FILE_SIZE,
    NAME_MAX,
    PATH_MAX,
    RELATIME_AGE_NS,
    XATTR_SIZE_MAX,
    CoreSettings,
)
from dfsfs.core.write_buffer import FileState, PendingChunk
from dfsfs.errors import (
    DfsfsError,
    ExistsError,
    FileTooLargeError,
    InvalidArgumentError,
    IsDirectoryError,
    NameTooLongError,
    NoAttributeError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
    QuotaExceededError,
    StaleError,
)
from dfsfs.meta.feed import Change, EntryChanged
from dfsfs.meta.store import MetadataStore
from dfsfs.recovery import RecoveryReport
from dfsfs.types import Attrs, QueuedRemoval, Usage

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # renameat2(2): the two names swap inodes

UNSUPPORTED_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
MAP_AT_OPEN_CHUNKS = 64  # files up to this many chunks get their chunk map with their attrs
CAPABILITY_XATTR = b"security.capability"  # asked for by the kernel before writes
NODE_TYPES = (stat_module.S_IFREG, stat_module.S_IFDIR, stat_module.S_IFLNK, stat_module.S_IFIFO,
              stat_module.S_IFSOCK, stat_module.S_IFCHR, stat_module.S_IFBLK)


@dataclass(frozen=True)
class EntryInvalidation:
    """The kernel must look this name up again; `deleted`: the inode it named is gone
    from it (the kernel tells inotify watchers)."""

    parent_ino: int
    name: bytes
    deleted: int = 0


@dataclass(frozen=True)
class InodeInvalidation:
    """The kernel must drop an inode's cached attributes and pages."""

    ino: int


KernelInvalidation = EntryInvalidation | InodeInvalidation


@dataclass(frozen=True)
class Capacity:
    """What statfs reports: the account's quota and use, or its use and the store's room."""

    total_bytes: int
    free_bytes: int
    total_inodes: int
    free_inodes: int


class FileSystem:
    """The core of one mounted namespace. `ino` values are the metadata store's inode ids."""

    def __init__(self, meta: MetadataStore, store: MirroredChunkStore, settings: CoreSettings,
                 capacity_probe: Callable[[], tuple[int, int]] | None = None):
        self.meta = meta
        self.store = store
        self.settings = settings
        self.root_ino = meta.root_ino
        self.capacity_probe = capacity_probe  # (total, free) bytes where the primary store is
        self.offload = Offload(settings)
        self.budget = WriteBudget(settings.write_buffer_bytes)
        self.states: dict[int, FileState] = {}
        self.attrs = AttrView(self.states, settings.attr_cache_s)
        self.handles = HandleTable()
        self.inodes = InodeTable(self.root_ino)
        self.reader = Reader(meta, store, self.offload, settings)
        self.reclaimer = Reclaimer(meta, store, self.offload, self.reader.cache.discard)
        self.committer = Committer(meta, store, self.offload, settings, self.reclaimer.add)
        self.chunk_writer = self.committer.chunk_writer
        self.removals = RemovalQueue(meta, self.offload, self._removed)
        self.releaser = InodeReleaser(meta, self.offload, self.reclaimer.add, self._purged,
                                      grace_s=settings.attr_cache_s + 1.0)
        self._names_gone_at: dict[int, float] = {}  # inodes whose last name went (trio clock)
        self.damage = DamageLog(meta, self.offload)
        self._missing_xattrs: TTLCache[tuple[int, bytes], bool] = TTLCache(
            settings.missing_xattr_cache_s)
        self._names: TTLCache[tuple[int, bytes], int] = TTLCache(3600.0, 100_000)  # → ino
        self.listings = KnownListings()
        self._usage: tuple[float, Usage] | None = None
        self._nursery: trio.Nursery | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self):
        """Serve with the background work running; on exit everything is committed and
        made durable, this mount's holds are let go, and freed chunks are reclaimed."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.reader.start(nursery)
            for name, step in (("reservations", self.chunk_writer.run_reservations),
                               ("commits", self.committer.run_commits),
                               ("sync points", self.committer.run_sync_points),
                               ("removals", self.removals.run),
                               ("releases", self.releaser.run),
                               ("reclaim", self.reclaimer.run),
                               ("damage records", self.damage.run),
                               ("idle commits", self._commit_idle_or_pressed)):
                nursery.start_soon(supervised, name, step)
            try:
                yield self
            finally:
                try:
                    with trio.CancelScope(shield=True):  # on every way out
                        await self.commit_everything()
                finally:
                    nursery.cancel_scope.cancel()

    async def commit_everything(self) -> None:
        """Unmount: commit every file, settle removals and releases, make it all durable,
        and reclaim what was freed. One failure does not cost the others theirs."""
        for what, step in (("removals", self.removals.settle),
                           ("files", self._commit_all_states),
                           ("releases", self._release_all),
                           ("sync", self.committer.sync),
                           ("reclaim", self.reclaimer.settle),
                           ("damage records", self.damage.settle)):
            try:
                await step()
            except DfsfsError as error:
                log.error("unmounting: %s could not be completed: %s", what, error)
            except Exception:  # noqa: BLE001 - the other steps must still run
                log.exception("unmounting: %s failed", what)

    async def _commit_all_states(self) -> None:
        for state in list(self.states.values()):
            try:
                await self._commit(state)
            except DfsfsError as error:
                log.error("inode %d: buffered writes could not be committed: %s", state.ino, error)

    async def _release_all(self) -> None:
        for ino in self.inodes.all_held():
            self.releaser.release(ino)
        await self.releaser.settle(everything=True)

    async def recover(self, ended_sessions: list[int]) -> RecoveryReport:
        """At mount: settle what sessions of the account that are over left behind (see
        dfsfs/recovery.py). `ended_sessions` are sessions found dead on this machine. Takes
        as long as checking the unsettled chunks takes: no timeout."""
        try:
            report = await trio.to_thread.run_sync(recovery.recover, self.meta, self.store,
                                                   self.settings.chunk_size, ended_sessions)
        except DfsfsError as error:  # the next mount, or fsck, settles them
            log.warning("recovery of ended sessions deferred: %s", error)
            return RecoveryReport()
        if report.ended_sessions or report.purged_inodes or report.cut_files:
            log.info("recovery: %d sessions over, %d unlinked inodes purged, %d chunks settled,"
                     " %d files cut back", report.ended_sessions, report.purged_inodes,
                     report.settled_chunks, len(report.cut_files))
        return report

    # ---- names and attributes --------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: bytes) -> Attrs:
        _check_name(name)
        if self.removals.hides(parent_ino, name) or self.listings.absent(parent_ino, name):
            raise NotFoundError("no such entry")
        attrs = await self._settled_attrs(self.meta.lookup, parent_ino, name)
        self._names.put((parent_ino, name), attrs.ino)
        return self.attrs.shown(attrs)

    async def getattr(self, ino: int) -> Attrs:
        state = self.states.get(ino)
        if state is not None and state.open_handles:
            if self.removals:
                await self.removals.settle()  # one of them may be this file's name: nlink 0
            return state.seen_attrs(state.attrs)  # close-to-open: an open file's attrs are ours
        kept = self.attrs.kept(ino)
        if kept is not None and not self._may_lag(kept):
            return kept
        try:
            attrs = await self._settled_attrs(self.meta.get_attrs, ino)
        except NotFoundError:
            raise StaleError(f"inode {ino} is gone") from None
        return self.attrs.shown(attrs)

    async def _settled_attrs(self, query, *args) -> Attrs:
        """Attributes from the database; asked again after the queued removals when those
        may change them, or when a batch of them landed while these were read."""
        batches = self.removals.batches_applied
        attrs = await self.offload.meta(query, *args)
        if self._may_lag(attrs, batches):
            await self.removals.settle()
            attrs = await self.offload.meta(query, *args)
        return attrs

    def _may_lag(self, attrs: Attrs, batches_seen: int | None = None) -> bool:
        """Whether removals may change these attributes: another of its names may be among
        those queued, or among a batch that landed since `batches_seen` (a directory's own
        entries are kept in step by dir_changed)."""
        landed = batches_seen is not None and self.removals.batches_applied != batches_seen
        return (bool(self.removals) or landed) and not attrs.is_dir and attrs.nlink > 1

    async def setattr(self, ino: int, caller_uid: int, *, size: int | None = None,
                      **changes: int) -> Attrs:
        if size is not None:
            await self._truncate(ino, size)
            self.attrs.forget(ino)
        if {"uid", "gid"} & set(changes) and caller_uid != 0:
            current = await self.offload.meta(self.meta.get_attrs, ino)
            if changes.get("uid", current.uid) != current.uid:
                raise PermissionDeniedError("only the owner may own files here")
        if changes:
            state = self.states.get(ino)
            if state is not None and state.has_uncommitted:
                state.fold(changes, time.time_ns())
                return state.seen_attrs(state.attrs)
            return self.attrs.shown(
                await self.offload.meta(self.meta.set_attrs, ino, time.time_ns(), **changes))
        return await self.getattr(ino)

    def opendir(self, ino: int) -> int:
        return self.handles.open_dir(ino)

    def releasedir(self, fh: int) -> None:
        self.handles.close_dir(fh)

    async def readdir(self, fh: int, after_id: int, limit: int
                      ) -> tuple[list[tuple[int, bytes, Attrs]], int]:
        """Entries after `after_id`, at most `limit`, and the directory's parent (for '..').
        The kernel takes a page's worth at a time and asks again from where it stopped:
        served from the handle's last page, and an ended listing is not queried again."""
        handle = self.handles.dir(fh)
        served = handle.serve(after_id, limit)
        if served is not None:
            return served, handle.parent_ino
        if self.removals.touches(handle.ino):
            await self.removals.settle()
        rows, parent = await self.offload.meta(self.meta.readdir, handle.ino, after_id, limit)
        entries = [(entry_id, name, self.attrs.shown(attrs)) for entry_id, name, attrs in rows]
        handle.fetched(after_id, entries, complete=len(entries) < limit)
        handle.parent_ino = parent if parent is not None else handle.ino
        return entries, handle.parent_ino

    async def readlink(self, ino: int) -> bytes:
        return await self.offload.meta(self.meta.readlink, ino)

    # ---- the kernel's references -------------------------------------------------------------

    def kernel_took(self, ino: int) -> None:
        """The kernel was given an entry for `ino` (it holds one more reference)."""
        self.inodes.looked_up(ino)

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped `count` references to `ino`."""
        if self.inodes.forgotten(ino, count):
            self._release(ino)
        if not self.inodes.referenced(ino):
            self.attrs.forget(ino)

    # ---- changes made by other mounts ------------------------------------------------------

    def changed_elsewhere(self, changes: list[Change]) -> list[KernelInvalidation]:
        """Another mount of the account committed these changes: forget what is kept of
        them here, and say what the kernel must forget (only what it can know: inodes it
        holds references to, entries of directories it holds)."""
        invalidations = []
        for change in changes:
            if isinstance(change, EntryChanged):
                self._names.discard((change.parent_ino, change.name))
                if change.gone:
                    self.listings.removed(change.parent_ino, change.name)
                else:
                    self.listings.added(change.parent_ino, change.name)
                self.attrs.forget(change.parent_ino)
                if self._kernel_knows(change.parent_ino):
                    deleted = change.ino if change.gone and self.inodes.referenced(change.ino) else 0
                    invalidations.append(EntryInvalidation(change.parent_ino, change.name, deleted))
            else:
                self.attrs.forget(change.ino)
                if self.inodes.referenced(change.ino):
                    invalidations.append(InodeInvalidation(change.ino))
        return invalidations

    def _kernel_knows(self, ino: int) -> bool:
        return ino == self.root_ino or self.inodes.referenced(ino)

    # ---- namespace changes -------------------------------------------------------------------

    async def make_node(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
                        rdev: int = 0, target: bytes | None = None, hold: bool = False) -> Attrs:
        _check_name(name)
        if stat_module.S_IFMT(mode) not in NODE_TYPES:
            raise NotSupportedError("unknown file type")
        if target is not None and len(target) >= PATH_MAX:
            raise NameTooLongError("symbolic link target too long")
        await self.removals.settle()  # the name may be one of them
        mode, gid = await self._inherited_group(parent_ino, mode, gid)
        now_ns = time.time_ns()
        attrs = await self.offload.meta(self.meta.make_node, parent_ino, name, mode, uid, gid,
                                        now_ns, rdev, target, hold)
        self.attrs.dir_changed(parent_ino, now_ns, nlink_delta=1 if attrs.is_dir else 0)
        self._names.put((parent_ino, name), attrs.ino)
        self.listings.added(parent_ino, name)
        if attrs.is_dir:
            self.listings.known(attrs.ino, set())  # made here, empty
        return self.attrs.shown(attrs)

    async def _inherited_group(self, parent_ino: int, mode: int, gid: int) -> tuple[int, int]:
        """A setgid directory gives new entries its group, and new subdirectories its
        setgid bit (as ext4 does; the kernel leaves this to the file system)."""
        parent = self.attrs.kept(parent_ino) or await self.getattr(parent_ino)
        if not parent.mode & stat_module.S_ISGID:
            return mode, gid
        if stat_module.S_ISDIR(mode):
            mode |= stat_module.S_ISGID
        return mode, parent.gid

    async def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int,
                     flags: int) -> tuple[int, Attrs]:
        try:
            attrs = await self.make_node(parent_ino, name, stat_module.S_IFREG | (mode & 0o7777),
                                         uid, gid, hold=True)
        except ExistsError:
            if flags & os.O_EXCL:
                raise
            # Another mount made the name since this one looked: open what is there.
            self.listings.forget(parent_ino)
            attrs = await self.lookup(parent_ino, name)
            fh, _ = await self.open(attrs.ino, flags)
            return fh, await self.getattr(attrs.ino)
        self._missing_xattrs.put((attrs.ino, CAPABILITY_XATTR), True)  # a new file has none
        state = self.states.get(attrs.ino)
        if state is None:
            state = self.states[attrs.ino] = FileState(attrs)
            state.chunk_map = {}
        return self._open_handle(state), attrs

    async def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attrs:
        _check_name(new_name)
        await self.removals.settle()
        await self._commit_if_open(ino)
        now_ns = time.time_ns()
        attrs = await self.offload.meta(self.meta.link, ino, new_parent_ino, new_name, now_ns)
        self.attrs.dir_changed(new_parent_ino, now_ns)
        self._names.put((new_parent_ino, new_name), ino)
        self.listings.added(new_parent_ino, new_name)
        return self.attrs.shown(attrs)

    async def unlink(self, parent_ino: int, name: bytes, *, directory: bool = False) -> None:
        """Remove a name: a file's is queued and answered at once (see core/removals)."""
        _check_name(name)
        removal = QueuedRemoval(parent_ino, name, time.time_ns(), directory)
        await self.removals.remove(removal)
        self._names.discard((parent_ino, name))
        self.listings.removed(parent_ino, name)
        self.attrs.dir_changed(parent_ino, removal.now_ns, nlink_delta=-1 if directory else 0)

    async def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                     new_name: bytes, flags: int) -> None:
        """Rename. A file written by this mount since its last sync point is made durable
        first: the safe-save pattern (write a temporary file, rename it over the old one)
        never leaves an empty or partial file after a crash."""
        _check_name(old_name)
        _check_name(new_name)
        await self.removals.settle()
        source_ino = await self._ino_of(old_parent_ino, old_name)
        await self._commit_if_open(source_ino)
        if source_ino in self.committer.written_since_sync:
            await self.committer.sync()
        moved, replaced = await self.offload.meta(
            self.meta.rename, old_parent_ino, old_name, new_parent_ino, new_name, flags,
            time.time_ns())
        # (`source_ino` may be stale: another mount may have replaced the name since)
        for ino in (old_parent_ino, new_parent_ino, source_ino, moved.ino):  # times, link counts
            self.attrs.forget(ino)
        self._names.discard((old_parent_ino, old_name))
        self._names.put((new_parent_ino, new_name), moved.ino)
        if not flags & RENAME_EXCHANGE:
            self.listings.removed(old_parent_ino, old_name)
            self.listings.added(new_parent_ino, new_name)
        if replaced is not None:
            self._removed(replaced)

    async def _ino_of(self, parent_ino: int, name: bytes) -> int:
        ino = self._names.get((parent_ino, name))
        if ino is None:
            ino = (await self.offload.meta(self.meta.lookup, parent_ino, name)).ino
        return ino

    def _removed(self, attrs: Attrs) -> None:
        """One of an inode's names went; with none left, this session holds it until the
        kernel and the handles here let go."""
        self.attrs.forget(attrs.ino)
        state = self.states.get(attrs.ino)
        if state is not None:
            state.attrs = attrs
        if attrs.nlink > 0:
            return
        self._count_growth(-attrs.size)
        self._names_gone_at[attrs.ino] = trio.current_time()
        if self.inodes.held(attrs.ino):
            self._release(attrs.ino)

    def _release(self, ino: int) -> None:
        """Neither the kernel nor a handle refers to `ino` any more: let go of it."""
        self.releaser.release(ino, self._names_gone_at.get(ino))

    def _purged(self, inos: list[int]) -> None:
        for ino in inos:
            self.states.pop(ino, None)
            self.attrs.forget(ino)
            self._names_gone_at.pop(ino, None)

    # ---- open files ------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; also says whether what the kernel cached of it is still current."""
        state = self.states.get(ino)
        current = True
        if state is None or not state.has_uncommitted:
            # Close-to-open: what other mounts committed is visible to the next open.
            try:
                attrs, chunk_map = await self.offload.meta(
                    self.meta.open_file, ino, MAP_AT_OPEN_CHUNKS * self.settings.chunk_size)
            except NotFoundError:
                raise StaleError(f"inode {ino} is gone") from None  # the kernel looks again
            if attrs.is_dir:
                raise IsDirectoryError("is a directory")
            # strictatime: every read must reach the core, not the kernel's page cache
            current = self.attrs.seen(attrs) and self.settings.atime != "strictatime"
            state = self.states.get(ino)
            if state is None:
                state = self.states[ino] = FileState(attrs)
            if not state.has_uncommitted:
                state.attrs = attrs
                state.size = state.committed_size = attrs.size
                state.chunk_map = chunk_map
        fh = self._open_handle(state)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            try:
                await self._truncate(ino, 0)  # the kernel hands O_TRUNC to us (atomic_o_trunc)
            except BaseException:
                await self.release(fh)
                raise
        return fh, current

    def _open_handle(self, state: FileState) -> int:
        self.inodes.opened(state.ino)
        return self.handles.open_file(state)

    async def flush(self, fh: int) -> None:
        """close(2): commit the file (visible to every mount at its next open); durable
        within the commit interval, or before returning with `sync_close`."""
        await self._commit(self.handles.file(fh))
        if self.settings.sync_close:
            await self.sync()

    async def fsync(self, fh: int) -> None:
        """The file's data and metadata, and every namespace change of this mount before,
        are durable when this returns."""
        await self._commit(self.handles.file(fh))
        await self.sync()

    async def sync(self) -> None:
        """fsyncdir, and the durability of fsync: every change of this mount so far."""
        await self.removals.settle()
        await self.committer.sync()

    async def release(self, fh: int) -> None:
        state = self.handles.close_file(fh)
        if state is None:
            return
        if not state.open_handles:
            try:
                await self._commit(state)
            except DfsfsError as error:
                # The last close already reported this; nothing is left to retry the writes.
                log.warning("inode %d closed with uncommitted writes, dropped: %s", state.ino, error)
                await self.committer.give_up(state)
            finally:
                if not state.open_handles and not state.has_uncommitted:
                    self.states.pop(state.ino, None)
                    self.attrs.shown(state.attrs)
        if self.inodes.closed(state.ino):
            self._release(state.ino)

    async def _commit_if_open(self, ino: int) -> None:
        state = self.states.get(ino)
        if state is not None:
            await self._commit(state)

    # ---- writing ---------------------------------------------------------------------------

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        state = self.handles.file(fh)
        if offset + len(data) > MAX_FILE_SIZE:
            raise FileTooLargeError(f"files end at {MAX_FILE_SIZE} bytes here")
        if state.error is not None:
            error, state.error = state.error, None
            raise error
        await self.committer.raise_failed_puts(state)
        await self._check_byte_quota(state, offset + len(data))
        await self.budget.wait_for_room(len(data))  # back-pressure before taking memory
        try:
            async with state.lock:
                await state.write(offset, data, self.settings.chunk_size,
                                  self._content_loader(state), self._seal)
        finally:
            self._charge(state)
        if state.pending_bytes >= self.settings.commit_batch_bytes:
            self._commit_in_background(state, stored_only=True)
        return len(data)

    def _content_loader(self, state: FileState):
        return lambda index: self.reader.chunk_content(state, index)

    def _seal(self, state: FileState, index: int, data: bytes | bytearray) -> None:
        """Hand a chunk's bytes to the ChunkWriter: stored now, committed later."""
        state.supersede(index)
        pending = state.pending[index] = PendingChunk(data)
        self._nursery.start_soon(self._store_sealed, state, pending)

    async def _store_sealed(self, state: FileState, pending: PendingChunk) -> None:
        """Store a sealed chunk; then commit what is stored when enough has gathered, or
        when writers wait for memory: a streaming writer's file commits behind it."""
        await self.chunk_writer.store_chunk(pending)
        if state.pending_bytes >= self.settings.commit_batch_bytes or self.budget.pressure.is_set():
            self._commit_in_background(state, stored_only=True)

    def _charge(self, state: FileState) -> None:
        """Charge the write budget with what `state` holds now."""
        held = state.held_bytes
        self.budget.charge(held - state.charged_bytes)
        state.charged_bytes = held

    async def _check_byte_quota(self, state: FileState, new_end: int) -> None:
        """Refuse growth past the quota at write() already (the commit checks it exactly)."""
        if new_end <= state.size:
            return
        usage = await self.usage()
        growth = new_end - state.committed_size
        if usage.quota_bytes is not None and usage.logical_bytes + growth > usage.quota_bytes:
            raise QuotaExceededError("byte quota exceeded")

    async def _commit(self, state: FileState, stored_only: bool = False) -> None:
        old_size = state.committed_size
        try:
            batch = await self.committer.commit_state(state, self._seal, stored_only)
        finally:
            self._charge(state)
        if batch or state.committed_size != old_size:
            self._count_growth(state.committed_size - old_size)
            self.attrs.wrote(state.attrs)

    def _commit_in_background(self, state: FileState, stored_only: bool = False) -> None:
        """Commit in the background; asked while one runs, commit again after it (all of
        it if either asked for that)."""
        if state.commit_scheduled:
            state.commit_again = stored_only and state.commit_again is not False
            return
        state.commit_scheduled = True
        self._nursery.start_soon(self._background_commit, state, stored_only)

    async def _background_commit(self, state: FileState, stored_only: bool) -> None:
        try:
            await self._commit(state, stored_only)
        except DfsfsError as error:
            log.warning("background commit of inode %d failed: %s", state.ino, error)
            if not state.has_uncommitted:
                state.error = error  # writes were lost: the file's next call must say so
            # otherwise the writes stay buffered and a later commit retries them
        finally:
            state.commit_scheduled = False
            again, state.commit_again = state.commit_again, None
            if again is not None:
                self._commit_in_background(state, stored_only=again)

    async def _commit_idle_or_pressed(self) -> None:
        """Commit writes that sat idle too long, and the largest when memory runs short."""
        with trio.move_on_after(1.0):
            await self.budget.pressure.wait()
        pressure = self.budget.pressure.is_set()
        if pressure:
            self.budget.pressure = trio.Event()
        now = time.monotonic()
        for state in sorted(self.states.values(), key=lambda s: -s.held_bytes):
            if not state.has_uncommitted:
                continue
            if now - state.last_write > self.settings.idle_commit_s:
                self._commit_in_background(state)
            elif pressure:  # what is stored goes first; a state with only buffers, whole
                self._commit_in_background(state, stored_only=bool(state.pending))

    async def _truncate(self, ino: int, new_size: int) -> None:
        if new_size < 0:
            raise InvalidArgumentError("negative size")
        if new_size > MAX_FILE_SIZE:
            raise FileTooLargeError(f"files end at {MAX_FILE_SIZE} bytes here")
        state = self.states.get(ino)
        temporary = state is None
        if temporary:
            try:
                attrs, chunk_map = await self.offload.meta(self.meta.open_file, ino, 0)
            except NotFoundError:
                raise StaleError(f"inode {ino} is gone") from None
            if attrs.is_dir:
                raise IsDirectoryError("is a directory")
            self.inodes.opened(ino)
            state = self.states[ino] = FileState(attrs)
            state.chunk_map = chunk_map
        try:
            async with state.lock:
                await state.truncate(new_size, self.settings.chunk_size,
                                     self._content_loader(state))
            await self._commit(state)
        finally:
            if temporary:
                if not state.open_handles and not state.has_uncommitted:
                    self.states.pop(ino, None)
                if self.inodes.closed(ino):
                    self._release(ino)

    # ---- reading ---------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        state = self.handles.file(fh)
        data = await self.reader.read(state, offset, length)
        if self._atime_due(state.seen_attrs(state.attrs)):
            state.accessed(time.time_ns())  # committed with the file, at its close
        return data

    def _atime_due(self, attrs: Attrs) -> bool:
        """Whether a read updates the access time, as ext4 decides for the atime modes."""
        if self.settings.atime == "strictatime":
            return True
        if self.settings.atime != "relatime":
            return False
        return (attrs.atime_ns <= max(attrs.mtime_ns, attrs.ctime_ns)
                or time.time_ns() - attrs.atime_ns > RELATIME_AGE_NS)

    # ---- extended attributes ---------------------------------------------------------------

    async def get_xattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        if self._missing_xattrs.get((ino, name)):
            raise NoAttributeError("no such attribute")
        try:
            return await self.offload.meta(self.meta.get_xattr, ino, name)
        except NoAttributeError:
            self._missing_xattrs.put((ino, name), True)
            raise

    async def list_xattrs(self, ino: int) -> list[bytes]:
        return await self.offload.meta(self.meta.list_xattrs, ino)

    async def set_xattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        _check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise InvalidArgumentError("attribute value too large")
        self._missing_xattrs.discard((ino, name))
        self.attrs.forget(ino)  # ctime changes
        await self.offload.meta(self.meta.set_xattr, ino, name, value, flags, time.time_ns())

    async def remove_xattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        self.attrs.forget(ino)
        await self.offload.meta(self.meta.remove_xattr, ino, name, time.time_ns())

    # ---- usage ---------------------------------------------------------------------------------

    async def usage(self) -> Usage:
        """The account's usage counters, kept briefly: file managers call statfs often."""
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > self.settings.statfs_cache_s:
            self._usage = (now, await self.offload.meta(self.meta.usage))
        return self._usage[1]

    def _count_growth(self, growth: int) -> None:
        """Keep the kept usage in step with this mount's own commits (quota checks)."""
        if self._usage is not None and growth:
            kept_at, usage = self._usage
            self._usage = (kept_at, replace(usage, logical_bytes=usage.logical_bytes + growth))

    async def capacity(self) -> Capacity:
        """The quota and the account's use; without a quota, the account's use and the room
        left where the primary store is (so `df` shows this account, not the host disk)."""
        usage = await self.usage()
        store_free = (await trio.to_thread.run_sync(self.capacity_probe))[1] \
            if self.capacity_probe else 0
        if usage.quota_bytes is not None:
            total = usage.quota_bytes
            free = max(0, min(total - usage.logical_bytes, store_free or total))
        else:
            total, free = usage.logical_bytes + store_free, store_free
        if usage.quota_inodes is not None:
            total_inodes = usage.quota_inodes
        else:
            total_inodes = max(usage.inodes + 1_000_000, 2 * usage.inodes)
        return Capacity(total, free, total_inodes, max(0, total_inodes - usage.inodes))


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
