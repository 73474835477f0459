"""Storing chunks, committing files, and the sync points that make both durable.

The protocol (meta/migrations/0008_write_path.sql has the server side):
1. A sealed chunk is hashed and put into both stores, without waiting for the disks and
   without a metadata call; it is "unsettled" until the next sync point.
2. A commit points the file's chunk indices at the chunks it put, in one call for every
   file waiting to commit at that moment, in the order they asked. A chunk new to the
   account gets its row there, taken on trust unless a deletion of it was claimed lately
   (the deletion may have removed the bytes after the put): then the commit is refused,
   and the chunk is secured — reserved (a hold, which waits for a deletion under way to
   end) and put again — before the commit is sent again. A put too old to trust is
   secured before its commit. The commit does not wait for the WAL flush: visible to
   every mount at once, durable at the next sync point. Chunks put and then overwritten
   before any commit named them are claimed for deletion at once (invariant 5).
4. A sync point (every `commit_interval_s` while anything is unsettled; fsync; fsyncdir;
   a rename of a freshly written file; unmount) syncs both stores, then settles the chunks
   in a durable commit, which flushes the WAL with every earlier commit of the mount.
   After a power cut the next mount finds the references whose bytes were not settled,
   checks the stores, and cuts back the files whose bytes did not survive.
"""

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dfsfs import recovery
from dfsfs.chunks.base import ChunkStore
from dfsfs.core import chunking
from dfsfs.core.offload import Offload
from dfsfs.core.settings import CoreSettings
from dfsfs.core.write_buffer import FileState, PendingChunk, Sealer
from dfsfs.errors import (
    BusyError,
    DfsfsError,
    MetadataUnavailableError,
    StorageError,
    StoreUnavailableError,
)
from dfsfs.meta.store import MetadataStore
from dfsfs.types import ChunkRef, FileCommit, ReclaimableChunk, Reservation

log = logging.getLogger(__name__)

RESERVE_BATCH = 256  # chunks per reservation call
COMMIT_BATCH = 64  # files per commit call
BUSY_RETRY_S = 0.01  # a chunk whose bytes are being deleted: ask again after this
# A put older than this is not taken on trust by a commit (chunk_tombstones keep a claimed
# deletion for an hour; this leaves a wide margin).
TRUSTED_PUT_S = 600.0


@dataclass
class _Request:
    """A caller waiting for a batched metadata call: its input, then its result."""

    item: object
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None
    error: BaseException | None = None

    async def outcome(self):
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _Batches:
    """Requests that arrive while a call is under way travel together in the next one."""

    def __init__(self, limit: int):
        self.limit = limit
        self._send, self._receive = trio.open_memory_channel[_Request](float("inf"))

    async def ask(self, item):
        request = _Request(item)
        self.put(request)
        return await request.outcome()

    def put(self, request: _Request) -> None:
        self._send.send_nowait(request)

    async def serve(self, call) -> None:
        """Run `call(batch)` on each batch; a failure of the call is every caller's."""
        async for first in self._receive:
            batch = [first]
            while len(batch) < self.limit:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await call(batch)
            except BaseException as error:  # noqa: BLE001 - handed to every waiting caller
                for request in batch:
                    request.error = error
                    request.done.set()
                if not isinstance(error, DfsfsError):
                    raise


class ChunkWriter:
    """Stores sealed chunks: hash and put, in one worker thread call. A chunk's bytes are
    taken on trust by the commit that names them (dfsfs_take_chunk); one whose deletion may
    have crossed its put is `secured`: reserved (a hold; waiting for a deletion under way),
    and put again."""

    def __init__(self, meta: MetadataStore, store: ChunkStore, offload: Offload):
        self.meta = meta
        self.store = store
        self.offload = offload
        self._reservations = _Batches(RESERVE_BATCH)

    async def store_chunk(self, pending: PendingChunk) -> None:
        """Store one sealed chunk; the outcome lands on `pending` (its ref, or an error)."""
        try:
            pending.ref = await self.offload.chunks(self._hash_and_put, pending.data)
            pending.put_at = trio.current_time()
        except BaseException as error:  # noqa: BLE001 - reported by the commit that needs it
            pending.error = error
            if isinstance(error, trio.Cancelled):
                raise
        finally:
            pending.done.set()

    def _hash_and_put(self, data: bytes | bytearray) -> ChunkRef | None:
        """Worker thread: an all-zero chunk is a hole, stored nowhere."""
        ref = chunking.chunk_ref(data)
        if ref is not None:
            self.store.put(self.meta.account_id, ref.digest, data)
        return ref

    async def secure(self, pending: PendingChunk) -> None:
        """Hold the chunk (waiting for a deletion of it under way to end) and put it again
        if its bytes may be gone."""
        reservation = await self._reservations.ask(pending.ref)
        pending.chunk_id = reservation.chunk_id
        if reservation.must_store:
            await self.offload.chunks(self.store.put, self.meta.account_id, pending.ref.digest,
                                      pending.data)
        pending.put_at = trio.current_time()

    async def run_reservations(self) -> None:
        """Reserve what callers asked for, many at a time; retry chunks whose bytes were
        being deleted once the deletion is over."""
        await self._reservations.serve(self._reserve_batch)

    async def _reserve_batch(self, batch: list[_Request]) -> None:
        reservations = await self.offload.meta(
            self.meta.reserve_chunks, [r.item.digest for r in batch], [r.item.size for r in batch])
        by_digest = {r.digest: r for r in reservations}
        busy = []
        for request in batch:
            reservation = by_digest[request.item.digest]
            if reservation.chunk_id is None:
                busy.append(request)
                continue
            request.result = reservation
            request.done.set()
        if busy:
            await trio.sleep(BUSY_RETRY_S)
            for request in busy:
                self._reservations.put(request)

    async def forget(self, pendings: list[PendingChunk], keep: set[bytes]) -> list[ReclaimableChunk]:
        """Chunks put and then not committed (overwritten first, or their commit failed for
        good): drop the holds taken on them; claim the bytes no row names for deletion
        (except digests in `keep`, still wanted). Returns what is claimed or freed, for the
        reclaimer (claimed ones are deleted at once)."""
        held = [p.chunk_id for p in pendings if p.chunk_id is not None]
        # (a failed put may have left a copy in one store)
        loose = {p.ref.digest for p in pendings if p.chunk_id is None and p.ref is not None} - keep
        freed = await self.offload.meta(self.meta.drop_holds, held) if held else []
        if loose:
            claimed = await self.offload.meta(self.meta.claim_orphans, sorted(loose))
            await self.offload.chunks(recovery.delete_claimed, self.meta, self.store, claimed)
        return freed


class Committer:
    """Commits files in batches and runs the sync points (see the module docstring)."""

    def __init__(self, meta: MetadataStore, store: ChunkStore, offload: Offload,
                 settings: CoreSettings, reclaim: Callable[[list[ReclaimableChunk]], None]):
        self.meta = meta
        self.store = store
        self.offload = offload
        self.settings = settings
        self.reclaim = reclaim  # chunks a commit left without references
        # Chunks this mount committed since the last sync point: the sync point syncs the
        # stores (every put before it) and then settles them. (A digest is settled only once
        # committed: before, it may have no row to settle.)
        self._unsettled: set[bytes] = set()
        self.written_since_sync: set[int] = set()  # inodes this mount committed since then
        self._sync_lock = trio.Lock()
        self._commits = _Batches(COMMIT_BATCH)
        self.chunk_writer = ChunkWriter(meta, store, offload)

    # ---- commits ------------------------------------------------------------------------

    async def commit(self, commit: FileCommit) -> None:
        """Commit one file (with whatever else is waiting to commit); raises its refusal."""
        await self._commits.ask(commit)

    async def commit_state(self, state: FileState, seal: Sealer,
                           stored_only: bool = False) -> dict[int, PendingChunk]:
        """Commit a file's buffered writes and attribute changes; return the chunks the
        commit pointed it at.

        By default everything written so far (close, fsync): buffers are sealed and stored
        first. With `stored_only`, only chunks already stored, without waiting: a streaming
        writer's batches then commit behind it, as a growing prefix of the file. A commit
        that fails for good forgets the writes (raising why); one that fails because the
        database is away keeps them for a later commit.
        """
        async with state.commit_lock:
            if state.error is not None:
                error, state.error = state.error, None
                raise error
            if not state.has_uncommitted:
                return {}
            seen_seq = state.write_seq
            if stored_only:
                if state.drop_from is not None:
                    return {}  # a truncation commits whole, with everything before it
                batch, size = state.stored_prefix(self.settings.chunk_size)
                if not batch:
                    return {}
            else:
                async with state.lock:
                    state.seal_buffers(seal)
                batch, size = dict(state.pending), state.size
            superseded = list(state.superseded)
            for pending in [*batch.values(), *superseded]:
                await pending.done.wait()
            await self._give_up_failed_puts(state)
            changes = state.uncommitted_changes()
            drop_from = None if stored_only else state.drop_from
            commit = FileCommit(state.ino, size, {i: p.ref for i, p in batch.items()},
                                drop_from, changes)
            try:
                await self._commit_secured(commit, batch)
            except DfsfsError as error:
                if self.offload.metadata_reachable:  # refused: this will not commit later either
                    await self.give_up(state)
                raise
            await self._forget(superseded, state)
            state.superseded = [p for p in state.superseded if p not in superseded]
            for index, pending in batch.items():
                if state.pending.get(index) is pending:  # not replaced by a newer version
                    del state.pending[index]
            self._update_chunk_map(state, batch, drop_from)
            state.committed_size = size
            if not stored_only:
                state.drop_from = None
            state.attrs = dataclasses.replace(state.attrs, size=size, **changes)
            state.forget_committed(changes, saw_latest=state.write_seq == seen_seq
                                   and not state.buffers and not state.pending)
            return batch

    async def raise_failed_puts(self, state: FileState) -> None:
        """A chunk of the file that could not be stored fails the next write at once (the
        store is full, say), rather than the close after gigabytes more: the file's
        uncommitted writes are then forgotten, as a failed commit forgets them."""
        if _failed_puts(state):
            # Not while a commit of the file's stored chunks runs: forgetting its chunks
            # and size under it would leave committed chunks past the committed size.
            async with state.commit_lock:
                await self._give_up_failed_puts(state)

    async def _give_up_failed_puts(self, state: FileState) -> None:
        """(holding state.commit_lock) Raise why a chunk of the file could not be stored."""
        failed = _failed_puts(state)
        if not failed:
            return
        error = storage_error(next(iter(failed.values())).error)
        if all(isinstance(p.error, (MetadataUnavailableError, StoreUnavailableError))
               for p in failed.values()):
            state.unseal(failed)  # a server is away: a later commit stores them
        else:
            await self.give_up(state)
        raise error

    async def _commit_secured(self, commit: FileCommit, batch: dict[int, PendingChunk]) -> None:
        """Commit; a put old enough that a deletion of its chunk may have crossed it
        unseen (see chunk_tombstones), or a commit refused because one did, has its chunks
        secured first."""
        await self._secure(batch, put_before=trio.current_time() - TRUSTED_PUT_S)
        try:
            await self.commit(commit)
        except BusyError:
            await self._secure(batch, put_before=math.inf)
            await self.commit(commit)

    async def _secure(self, batch: dict[int, PendingChunk], put_before: float) -> None:
        """Secure the chunks of `batch` put before then and not secured yet."""
        for pending in batch.values():
            if pending.ref is not None and pending.chunk_id is None and pending.put_at < put_before:
                await self.chunk_writer.secure(pending)

    async def _forget(self, pendings: list[PendingChunk], state: FileState) -> None:
        """Chunks of `state` put and not committed: their holds and bytes go."""
        if pendings:
            wanted = {p.ref.digest for p in state.pending.values() if p.ref is not None}
            self.reclaim(await self.chunk_writer.forget(pendings, keep=wanted))

    @staticmethod
    def _update_chunk_map(state: FileState, batch: dict[int, PendingChunk],
                          drop_from: int | None) -> None:
        if state.chunk_map is None:
            return
        if drop_from is not None:
            for index in [i for i in state.chunk_map if i >= drop_from]:
                del state.chunk_map[index]
        for index, pending in batch.items():
            if pending.ref is None:
                state.chunk_map.pop(index, None)
            else:
                state.chunk_map[index] = pending.ref

    async def give_up(self, state: FileState) -> None:
        """Forget a file's uncommitted writes (their commit failed for good), and the
        chunks put for them."""
        dropped = state.drop_uncommitted()
        for pending in dropped:
            await pending.done.wait()
        try:
            await self._forget(dropped, state)
        except DfsfsError as error:  # fsck or the session's end settles them
            log.warning("inode %d: could not let go of %d chunks put for it: %s",
                        state.ino, len(dropped), error)

    async def run_commits(self) -> None:
        await self._commits.serve(self._commit_batch)

    async def _commit_batch(self, batch: list[_Request]) -> None:
        refusals, reclaimable = await self.offload.meta(
            self.meta.commit_files, [request.item for request in batch])
        self.reclaim(reclaimable)
        for request, refusal in zip(batch, refusals, strict=True):
            if refusal is None:
                self.written_since_sync.add(request.item.ino)
                self._unsettled.update(ref.digest for ref in request.item.chunks.values() if ref)
            request.error = refusal
            request.done.set()

    # ---- sync points ----------------------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether something this mount did is not durable yet."""
        return bool(self._unsettled) or self.meta.durability.behind

    async def sync(self) -> None:
        """Make durable everything this mount did before the call: the stores first, then
        the metadata (invariant 1). Concurrent callers share sync points."""
        async with self._sync_lock:
            if not self.behind:
                return
            digests = sorted(self._unsettled)
            inodes = set(self.written_since_sync)
            await self.offload.chunks(self.store.sync)
            if digests:
                await self.offload.meta(self.meta.settle, digests)
            else:
                await self.offload.meta(self.meta.flush_wal)
            self._unsettled.difference_update(digests)
            self.written_since_sync.difference_update(inodes)

    async def run_sync_points(self) -> None:
        """A sync point every commit interval while anything is unsettled."""
        while True:
            await trio.sleep(self.settings.commit_interval_s)
            if self.behind:
                await self.sync()


def storage_error(error: BaseException) -> DfsfsError:
    """A store failure as the error the caller reports."""
    if isinstance(error, DfsfsError):
        return error
    if isinstance(error, OSError):
        return StorageError(f"chunk store: {error.strerror or error}")
    return StorageError(f"chunk store: {error}")


def _failed_puts(state: FileState) -> dict[int, PendingChunk]:
    return {i: p for i, p in state.pending.items() if p.done.is_set() and p.error is not None}
