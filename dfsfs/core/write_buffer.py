"""The in-memory state of a file with writes not yet committed: chunk buffers, sealed chunks,
and the attribute changes that ride with them.

A write lands in its chunk's buffer. A buffer is sealed (handed to the ChunkWriter, which
stores it at once) when writes since it started cover the whole chunk — a streaming writer
— and otherwise stays in memory until the file is committed: overwriting part of a chunk
many times stores it once per commit (invariant 5). A sealed chunk that is overwritten
again before its commit is superseded: its hold is dropped at the next commit.
"""

import time
from collections.abc import Awaitable, Callable

import trio

from dfsfs.core import chunking
from dfsfs.types import Attrs, ChunkRef

ContentLoader = Callable[[int], Awaitable[bytes | bytearray]]  # chunk index → current bytes
Sealer = Callable[["FileState", int, "bytes | bytearray"], None]


class ChunkBuffer:
    """A chunk being written: its bytes, and how far from its start the writes since the
    buffer began cover it without a gap."""

    __slots__ = ("data", "covered")

    def __init__(self, data: bytearray):
        self.data = data
        self.covered = 0

    def write(self, start: int, piece) -> None:
        if start > len(self.data):
            self.data.extend(bytes(start - len(self.data)))
        self.data[start:start + len(piece)] = piece
        if start <= self.covered:
            self.covered = max(self.covered, start + len(piece))


class PendingChunk:
    """A sealed chunk: being stored (hashed, put), or stored and waiting for the commit
    that points the file at it."""

    __slots__ = ("data", "ref", "chunk_id", "put_at", "error", "done")

    def __init__(self, data: bytes | bytearray):
        self.data = data
        self.ref: ChunkRef | None = None  # None once done without error: all zeros (a hole)
        self.chunk_id: int | None = None  # a chunk row this mount holds a use of (if secured)
        self.put_at = 0.0  # when its put returned (trio clock)
        self.error: BaseException | None = None
        self.done = trio.Event()

    @property
    def stored(self) -> bool:
        return self.done.is_set() and self.error is None


class FileState:
    """A file that is open, or has writes or attribute changes not committed yet."""

    def __init__(self, attrs: Attrs):
        self.ino = attrs.ino
        self.attrs = attrs  # as last committed or read; serves getattr while open
        self.size = attrs.size  # logical size including buffered writes
        self.committed_size = attrs.size
        self.mtime_ns: int | None = None  # set by buffered writes (or utimens) until committed
        self.ctime_ns: int | None = None  # of the last write or attribute change not committed
        self.changed_attrs: dict[str, int] = {}  # mode, uid, gid, atime_ns: see `fold`
        self.buffers: dict[int, ChunkBuffer] = {}
        self.pending: dict[int, PendingChunk] = {}
        self.superseded: list[PendingChunk] = []  # stored, then overwritten before a commit
        self.drop_from: int | None = None  # a truncation: chunks from here on go at the commit
        self.chunk_map: dict[int, ChunkRef] | None = None
        self.open_handles = 0
        self.lock = trio.Lock()  # serialises writes and truncations
        self.commit_lock = trio.Lock()  # serialises commits, so they land in order
        self.write_seq = 0  # counts changes, to tell whether a commit saw the latest
        self.last_write = 0.0
        self.last_read_end = -1
        self.error: BaseException | None = None  # a background commit failure, reported later
        self.commit_scheduled = False
        self.commit_again: bool | None = None  # another commit wanted after the one running
                                               # (stored_only), or None
        self.charged_bytes = 0  # what this state holds, as charged to the write budget

    # ---- what is uncommitted --------------------------------------------------------------

    @property
    def has_uncommitted(self) -> bool:
        return bool(self.buffers or self.pending or self.superseded or self.changed_attrs
                    or self.mtime_ns is not None or self.drop_from is not None
                    or self.size != self.committed_size)

    @property
    def held_bytes(self) -> int:
        """Bytes of file data this state keeps in memory."""
        return (sum(len(b.data) for b in self.buffers.values())
                + sum(len(p.data) for p in self.pending.values())
                + sum(len(p.data) for p in self.superseded))

    @property
    def pending_bytes(self) -> int:
        return sum(len(p.data) for p in self.pending.values())

    # ---- attribute changes ----------------------------------------------------------------

    def fold(self, changes: dict[str, int], now_ns: int) -> None:
        """An attribute change while writes are buffered: it is committed with them, in
        one commit (tar sets times, owner and mode of each file before closing it)."""
        changes = dict(changes)
        if "mtime_ns" in changes:
            self.mtime_ns = changes.pop("mtime_ns")  # a later write moves it on again
        self.changed_attrs.update(changes)
        self.ctime_ns = now_ns
        self.write_seq += 1

    def accessed(self, now_ns: int) -> None:
        """A read the mount's atime mode says updates the access time (no ctime change)."""
        self.changed_attrs["atime_ns"] = now_ns

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

    def seen_attrs(self, attrs: Attrs) -> Attrs:
        """Attributes as this mount sees them: buffered writes change size and times."""
        if not self.has_uncommitted:
            return attrs
        mtime = self.mtime_ns if self.mtime_ns is not None else attrs.mtime_ns
        ctime = max(attrs.ctime_ns, self.ctime_ns or 0)
        return Attrs(attrs.ino, self.changed_attrs.get("mode", attrs.mode),
                     self.changed_attrs.get("uid", attrs.uid), self.changed_attrs.get("gid", attrs.gid),
                     self.size, attrs.nlink, self.changed_attrs.get("atime_ns", attrs.atime_ns),
                     mtime, ctime, attrs.rdev, attrs.stored_bytes)

    # ---- writing --------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes, chunk_size: int, load: ContentLoader,
                    seal: Sealer) -> None:
        """Put `data` at `offset` into the chunk buffers (call with `lock` held)."""
        view = memoryview(data)
        consumed = 0
        for index, start, stop in chunking.spans(offset, len(data), chunk_size):
            piece = view[consumed:consumed + stop - start]
            consumed += stop - start
            buffer = self.buffers.get(index)
            if buffer is None and start == 0 and stop == chunk_size:
                # A whole chunk (the usual streaming write): no copy, straight to storage.
                seal(self, index, data if len(data) == chunk_size else bytes(piece))
                continue
            if buffer is None:
                buffer = await self._start_buffer(index, start, stop, chunk_size, load)
            buffer.write(start, piece)
            if buffer.covered == chunk_size:
                seal(self, index, self.buffers.pop(index).data)
        self.size = max(self.size, offset + len(data))
        self.write_seq += 1
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self.last_write = time.monotonic()

    async def _start_buffer(self, index: int, start: int, stop: int, chunk_size: int,
                            load: ContentLoader) -> ChunkBuffer:
        """A buffer holding the chunk's current bytes where the write will not cover them."""
        extent = min(chunk_size, max(0, self.size - index * chunk_size))
        if start == 0 and stop >= extent:
            buffer = ChunkBuffer(bytearray())
        else:
            content = bytearray(await load(index))
            if len(content) < extent:
                content.extend(bytes(extent - len(content)))
            buffer = ChunkBuffer(content)
        self.buffers[index] = buffer
        return buffer

    def supersede(self, index: int) -> None:
        """Chunk `index` is sealed anew or cut: its earlier sealed version's hold goes."""
        old = self.pending.pop(index, None)
        if old is not None:
            self.superseded.append(old)

    def unseal(self, chunks: dict[int, "PendingChunk"]) -> None:
        """Sealed chunks that could not be stored (the database was away) become buffers
        again, for a later commit to store."""
        for index, pending in chunks.items():
            if self.pending.get(index) is pending:
                del self.pending[index]
                if index not in self.buffers:
                    buffer = self.buffers[index] = ChunkBuffer(bytearray(pending.data))
                    buffer.covered = len(pending.data)

    def seal_buffers(self, seal: Sealer) -> None:
        """Seal every buffer (a commit stores them all)."""
        for index in sorted(self.buffers):
            seal(self, index, self.buffers.pop(index).data)

    # ---- truncating -----------------------------------------------------------------------

    async def truncate(self, new_size: int, chunk_size: int, load: ContentLoader) -> None:
        """Cut or extend the file to `new_size` (call with `lock` held); the next commit
        drops the stored chunks past it."""
        if new_size < self.size:
            boundary, remainder = divmod(new_size, chunk_size)
            first_gone = boundary + (1 if remainder else 0)
            for index in [i for i in self.buffers if i >= first_gone]:
                del self.buffers[index]
            for index in [i for i in self.pending if i >= first_gone]:
                self.supersede(index)
            if remainder:
                kept = self.buffers.get(boundary)
                if kept is None:
                    content = bytearray(await load(boundary))
                    self.supersede(boundary)
                    kept = self.buffers[boundary] = ChunkBuffer(content)
                del kept.data[remainder:]
            if new_size < self.committed_size or self.drop_from is not None:
                self.drop_from = min(first_gone, self.drop_from if self.drop_from is not None
                                     else first_gone)
        self.size = new_size
        self.write_seq += 1
        self.mtime_ns = self.ctime_ns = time.time_ns()

    # ---- what a commit takes ----------------------------------------------------------------

    def stored_prefix(self, chunk_size: int) -> tuple[dict[int, PendingChunk], int]:
        """Stored chunks below the first one still buffered or being stored, and the size
        they reach: a crash then leaves a prefix of what was written, never a gap."""
        unfinished = [i for i, p in self.pending.items() if not p.stored]
        first_unfinished = min(unfinished + list(self.buffers), default=None)
        batch = {i: p for i, p in self.pending.items()
                 if p.stored and (first_unfinished is None or i < first_unfinished)}
        reached = [i * chunk_size + len(p.data) for i, p in batch.items()]
        return batch, min(self.size, max([self.committed_size, *reached]))

    def drop_uncommitted(self) -> list[PendingChunk]:
        """Forget every uncommitted change (its commit failed for good); returns the sealed
        chunks whose holds must go."""
        dropped = [*self.pending.values(), *self.superseded]
        self.buffers.clear()
        self.pending.clear()
        self.superseded.clear()
        self.mtime_ns = self.ctime_ns = None
        self.changed_attrs.clear()
        self.drop_from = None
        self.size = self.committed_size
        return dropped
