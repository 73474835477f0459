"""Storing chunks, committing files, and the sync points that make both durable.

The protocol (meta/migrations/0008_write_path.sql has the server side):
1. A sealed chunk is hashed, then reserved: the mount takes a hold on its chunk row, and
   learns whether its bytes must be put (new, or not known durable). Reservations of
   chunks sealed at the same moment travel in one call.
2. The bytes are put into both stores, without waiting for the disks; the chunk is now
   "unsettled" until the next sync point. No transaction is open meanwhile.
3. A commit points the file's chunk indices at the reserved chunks (turning holds into
   references), in one call for every file waiting to commit at that moment, in the order
   they asked. It commits without waiting for the WAL flush: visible to every mount at
   once, durable at the next sync point.
4. A sync point (every `commit_interval_s` while anything is unsettled; fsync; fsyncdir;
   a rename of a freshly written file; unmount) syncs both stores, then settles the chunks
   in a durable commit, which flushes the WAL with every earlier commit of the mount.
   After a power cut the next mount finds the references whose bytes were not settled,
   checks the stores, and cuts back the files whose bytes did not survive.
"""

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dfsfs.chunks.base import ChunkStore
from dfsfs.core import chunking
from dfsfs.core.offload import Offload
from dfsfs.core.settings import CoreSettings
from dfsfs.core.write_buffer import FileState, PendingChunk, Sealer
from dfsfs.errors import DfsfsError, MetadataUnavailableError, StorageError
from dfsfs.meta.store import MetadataStore
from dfsfs.types import ChunkRef, FileCommit, ReclaimableChunk, Reservation

log = logging.getLogger(__name__)

RESERVE_BATCH = 256  # chunks per reservation call
COMMIT_BATCH = 64  # files per commit call
BUSY_RETRY_S = 0.01  # a chunk whose bytes are being deleted: ask again after this


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
    """Stores sealed chunks: hash (worker thread), reserve (batched), put (worker thread)."""

    def __init__(self, meta: MetadataStore, store: ChunkStore, offload: Offload,
                 committer: "Committer"):
        self.meta = meta
        self.store = store
        self.offload = offload
        self.committer = committer
        self._reservations = _Batches(RESERVE_BATCH)

    async def store_chunk(self, pending: PendingChunk) -> None:
        """Store one sealed chunk; the outcome lands on `pending` (ref, chunk_id or error)."""
        try:
            ref = await self.offload.chunks(chunking.chunk_ref, pending.data)
            if ref is not None:
                reservation = await self.reserve(ref)
                pending.chunk_id = reservation.chunk_id
                if reservation.must_store:
                    await self.offload.chunks(self.store.put, self.meta.account_id, ref.digest,
                                              pending.data)
                    self.committer.stored(reservation.chunk_id)
            pending.ref = ref
        except BaseException as error:  # noqa: BLE001 - reported by the commit that needs it
            pending.error = error
            if isinstance(error, trio.Cancelled):
                raise
        finally:
            pending.done.set()

    async def reserve(self, ref: ChunkRef) -> Reservation:
        return await self._reservations.ask(ref)

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


class Committer:
    """Commits files in batches and runs the sync points (see the module docstring)."""

    def __init__(self, meta: MetadataStore, store: ChunkStore, offload: Offload,
                 settings: CoreSettings, reclaim: Callable[[list[ReclaimableChunk]], None]):
        self.meta = meta
        self.store = store
        self.offload = offload
        self.settings = settings
        self.reclaim = reclaim  # chunks a commit left without references
        self._unsettled: set[int] = set()  # chunk ids this mount put since the last sync point
        self.written_since_sync: set[int] = set()  # inodes this mount committed since then
        self._sync_lock = trio.Lock()
        self._commits = _Batches(COMMIT_BATCH)

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
            failed = {i: p for i, p in batch.items() if p.error is not None}
            if failed:
                error = storage_error(next(iter(failed.values())).error)
                if all(isinstance(p.error, MetadataUnavailableError) for p in failed.values()):
                    state.unseal(failed)  # the database is away: a later commit stores them
                else:
                    await self.give_up(state)
                raise error
            changes = state.uncommitted_changes()
            drop_from = None if stored_only else state.drop_from
            commit = FileCommit(state.ino, size, {i: p.chunk_id for i, p in batch.items()},
                                drop_from, changes)
            try:
                await self.commit(commit)
            except DfsfsError as error:
                if self.offload.metadata_reachable:  # refused: this will not commit later either
                    await self.give_up(state)
                raise
            await self._drop_holds(p.chunk_id for p in superseded)
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
        """Forget a file's uncommitted writes (their commit failed for good) and the holds
        their stored chunks took."""
        dropped = state.drop_uncommitted()
        for pending in dropped:
            await pending.done.wait()
        try:
            await self._drop_holds(p.chunk_id for p in dropped)
        except DfsfsError as error:  # the session's end releases them
            log.warning("inode %d: could not drop the holds of %d chunks: %s",
                        state.ino, len(dropped), error)

    async def _drop_holds(self, chunk_ids) -> None:
        chunk_ids = [chunk_id for chunk_id in chunk_ids if chunk_id is not None]
        if chunk_ids:
            self.reclaim(await self.offload.meta(self.meta.drop_holds, chunk_ids))

    async def run_commits(self) -> None:
        await self._commits.serve(self._commit_batch)

    async def _commit_batch(self, batch: list[_Request]) -> None:
        refusals, reclaimable = await self.offload.meta(
            self.meta.commit_files, [request.item for request in batch])
        self.reclaim(reclaimable)
        for request, refusal in zip(batch, refusals, strict=True):
            if refusal is None:
                self.written_since_sync.add(request.item.ino)
            request.error = refusal
            request.done.set()

    # ---- sync points ----------------------------------------------------------------------

    def stored(self, chunk_id: int) -> None:
        """A put of this chunk returned: the next sync point makes it durable."""
        self._unsettled.add(chunk_id)

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
            chunk_ids = sorted(self._unsettled)
            inodes = set(self.written_since_sync)
            await self.offload.chunks(self.store.sync)
            if chunk_ids:
                await self.offload.meta(self.meta.settle, chunk_ids)
            else:
                await self.offload.meta(self.meta.flush_wal)
            self._unsettled.difference_update(chunk_ids)
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
