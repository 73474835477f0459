"""Removing names, letting go of inodes, and deleting the bytes of chunks nothing needs.

Glossary, in the order a file goes away:
- removal: unlink(2) of a name. Queued and answered at once; the RemovalQueue writes the
  queue to the database in batches, in order (rm -rf would otherwise wait for a
  transaction per file). Until a batch lands the queued names are hidden from lookups
  here, and every other namespace change, readdir of the directory and sync point settles
  the queue first. A directory, and every removal while the database does not answer,
  goes at the end of the next batch and waits for it.
- hold: a session's claim on an inode (open here, or its last name removed here while the
  kernel still references it) or on a chunk (being stored). An inode with no name left
  lives while a live session holds it.
- release: this mount lets go of an inode once neither its kernel nor an open handle
  refers to it; the InodeReleaser sends releases in batches. The last release of an
  inode with no name purges it (its rows and chunk references go).
- reclaim: a chunk left with no reference and no hold loses its bytes. The Reclaimer
  marks such chunks durably as being deleted (claim), deletes their bytes from both
  stores (backup first, so a reader never repairs a primary copy back into existence),
  then drops their rows (finish).
"""

import logging
from collections.abc import Callable

import trio

from dfsfs import recovery
from dfsfs.chunks.mirrored import MirroredChunkStore
from dfsfs.core.offload import Offload
from dfsfs.errors import DfsfsError
from dfsfs.meta.store import MetadataStore
from dfsfs.types import Attrs, QueuedRemoval, ReclaimableChunk

log = logging.getLogger(__name__)

REMOVAL_BATCH = 256  # queued removals per metadata call
REMOVAL_QUEUE_MAX = 4096  # an unlink waits for the queue to drain beyond this
RETRY_S = 1.0  # after a failed batch (the database away)
RELEASE_BATCH = 512  # inodes per release call
RECLAIM_GATHER_S = 0.2  # freed chunks are gathered this long, while more keep coming
RECLAIM_BATCH = 512  # chunks per reclaim round


class _SettledInBackground:
    """Work queued in memory that `settle` writes to the database; `run` settles it in the
    background once some is queued, and tries again while the database is away."""

    def __init__(self) -> None:
        self._wanted = trio.Event()

    async def settle(self) -> None:
        raise NotImplementedError

    def backlog(self) -> str:
        raise NotImplementedError

    async def _gather(self) -> None:
        """Wait for more before settling (by default, not at all)."""

    async def run(self) -> None:
        await self._wanted.wait()
        self._wanted = trio.Event()
        await self._gather()
        try:
            await self.settle()
        except DfsfsError as error:
            log.warning("%s not done yet (retrying): %s", self.backlog(), error)
            await trio.sleep(RETRY_S)
            self._wanted.set()


class RemovalQueue(_SettledInBackground):
    def __init__(self, meta: MetadataStore, offload: Offload, removed: Callable[[Attrs], None]):
        super().__init__()
        self.meta = meta
        self.offload = offload
        self.removed = removed  # the inode's attributes after one of its names went
        self.batches_applied = 0  # attributes read across a change of it may predate a batch
        self._queued: dict[tuple[int, bytes], QueuedRemoval] = {}
        self._applying = trio.Lock()

    def hides(self, parent_ino: int, name: bytes) -> bool:
        return (parent_ino, name) in self._queued

    def touches(self, parent_ino: int) -> bool:
        return any(parent == parent_ino for parent, _ in self._queued)

    def __bool__(self) -> bool:
        return bool(self._queued)

    async def remove(self, removal: QueuedRemoval) -> None:
        """Queue a file's removal (answered at once), or remove a directory, or anything
        while the database does not answer, at the end of the next batch."""
        if removal.directory or not self.offload.metadata_reachable:
            await self.settle(then=removal)
            return
        if len(self._queued) >= REMOVAL_QUEUE_MAX:
            await self.settle()
        self._queued[(removal.parent_ino, removal.name)] = removal
        self._wanted.set()

    async def settle(self, then: QueuedRemoval | None = None) -> None:
        """Write the queued removals to the database, in batches, and wait for them. `then`
        goes last, in the same call as the last of them; its refusal is raised."""
        async with self._applying:
            while self._queued or then is not None:
                batch = list(self._queued.values())[:REMOVAL_BATCH]
                last = None
                if then is not None and len(batch) < REMOVAL_BATCH:
                    last, then = then, None
                    batch.append(last)
                results = await self.offload.meta(self.meta.unlink_each, batch)
                self.batches_applied += 1
                for removal, result in zip(batch, results, strict=True):
                    if removal is not last:
                        del self._queued[(removal.parent_ino, removal.name)]
                    if isinstance(result, DfsfsError):
                        if removal is last:
                            raise result
                        # Gone meanwhile, or replaced: the kernel saw a file there.
                        log.info("queued removal of %r in directory %d: %s",
                                 removal.name, removal.parent_ino, result)
                        continue
                    self.removed(result)

    def backlog(self) -> str:
        return f"{len(self._queued)} removals"


class InodeReleaser(_SettledInBackground):
    """Sends this mount's releases of inodes in batches (see the glossary).

    An inode whose last name went moments ago is released only after `grace_s`: another
    mount's kernel may still resolve that name to it for as long as it keeps entries (the
    entry timeout), and an open there must find it (the kernel looks a name up once more
    after ESTALE, not again and again while a file is saved in a loop)."""

    def __init__(self, meta: MetadataStore, offload: Offload,
                 reclaim: Callable[[list[ReclaimableChunk]], None],
                 purged: Callable[[list[int]], None], grace_s: float):
        super().__init__()
        self.meta = meta
        self.offload = offload
        self.reclaim = reclaim
        self.purged = purged
        self.grace_s = grace_s
        self._released: dict[int, float] = {}  # ino → not before (trio clock)
        self._sending = trio.Lock()

    def release(self, ino: int, name_gone_at: float | None = None) -> None:
        not_before = 0.0 if name_gone_at is None else name_gone_at + self.grace_s
        self._released[ino] = max(not_before, self._released.get(ino, 0.0))
        self._wanted.set()

    async def _gather(self) -> None:
        """Wait until the first release is due."""
        if self._released:
            await trio.sleep_until(min(self._released.values()))

    async def settle(self, everything: bool = True) -> None:
        """Send the releases (only those due, unless `everything`: unmount)."""
        async with self._sending:
            while due := sorted(ino for ino, not_before in self._released.items()
                                if everything or not_before <= trio.current_time()):
                # Taken out before the call: an inode released again meanwhile (its last
                # name went while this batch was under way) is sent again.
                batch = due[:RELEASE_BATCH]
                taken = {ino: self._released.pop(ino) for ino in batch}
                try:
                    purged, freed = await self.offload.meta(self.meta.release_inodes, batch)
                except BaseException:
                    for ino, not_before in taken.items():
                        self._released.setdefault(ino, not_before)
                    raise
                self.purged(purged)
                self.reclaim(freed)
        if self._released:
            self._wanted.set()  # the later ones

    async def run(self) -> None:
        await self._wanted.wait()
        self._wanted = trio.Event()
        await self._gather()
        try:
            await self.settle(everything=False)
        except DfsfsError as error:
            log.warning("%s not done yet (retrying): %s", self.backlog(), error)
            await trio.sleep(RETRY_S)
            self._wanted.set()

    def backlog(self) -> str:
        return f"{len(self._released)} inode releases"


class Reclaimer(_SettledInBackground):
    """Deletes the bytes of chunks with no reference and no hold (see the glossary)."""

    def __init__(self, meta: MetadataStore, store: MirroredChunkStore, offload: Offload,
                 forget: Callable[[bytes], None]):
        super().__init__()
        self.meta = meta
        self.store = store
        self.offload = offload
        self.forget = forget  # drop a chunk from the read cache
        self._chunks: dict[int, ReclaimableChunk] = {}
        self._reclaiming = trio.Lock()

    def add(self, chunks: list[ReclaimableChunk]) -> None:
        if chunks:
            self._chunks.update((chunk.id, chunk) for chunk in chunks)
            self._wanted.set()

    async def _gather(self) -> None:
        """Reclaim once additions pause (or many have gathered): while rm -rf runs, its own
        work comes first, and one durable claim serves a whole batch."""
        gathered = -1
        while gathered < len(self._chunks) < RECLAIM_BATCH:
            gathered = len(self._chunks)
            await trio.sleep(RECLAIM_GATHER_S)

    def backlog(self) -> str:
        return f"reclaiming {len(self._chunks)} chunks"

    async def settle(self) -> None:
        async with self._reclaiming:
            while self._chunks:
                batch = [self._chunks.pop(i) for i in sorted(self._chunks)[:RECLAIM_BATCH]]
                for chunk in batch:
                    self.forget(chunk.digest)
                try:
                    await trio.to_thread.run_sync(recovery.reclaim, self.meta, self.store, batch,
                                                  limiter=self.offload.chunk_limiter)
                except BaseException:
                    self.add(batch)
                    raise
