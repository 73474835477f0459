"""Reading file contents: buffered writes first, then the read cache, then the stores (every
byte verified by the mirrored store), with readahead for sequential readers."""

import logging

import trio

from dfsfs.chunks.base import ChunkStore
from dfsfs.core import chunking
from dfsfs.core.caches import ReadCache
from dfsfs.core.offload import Offload
from dfsfs.core.settings import CoreSettings
from dfsfs.core.write_buffer import FileState
from dfsfs.errors import ChunkLostError, DfsfsError
from dfsfs.meta.store import MetadataStore
from dfsfs.types import ChunkRef

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, meta: MetadataStore, store: ChunkStore, offload: Offload,
                 settings: CoreSettings):
        self.meta = meta
        self.store = store
        self.offload = offload
        self.settings = settings
        self.cache = ReadCache(settings.read_cache_bytes)
        self._fetching: dict[bytes, trio.Event] = {}
        self._nursery: trio.Nursery | None = None  # for readahead, once running

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def read(self, state: FileState, offset: int, length: int) -> bytes:
        end = min(offset + length, state.size)
        if offset >= end:
            return b""
        pieces = []
        for index, start, stop in chunking.spans(offset, end - offset, self.settings.chunk_size):
            piece = (await self.chunk_content(state, index))[start:stop]
            if len(piece) < stop - start:
                piece = bytes(piece) + bytes(stop - start - len(piece))
            pieces.append(piece)
        if offset in (state.last_read_end, 0):
            self._read_ahead(state, end)
        state.last_read_end = end
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def chunk_content(self, state: FileState, index: int) -> bytes | bytearray:
        """A chunk's current bytes (buffered, else stored and verified); b'' for a hole."""
        buffer = state.buffers.get(index)
        if buffer is not None:
            return buffer.data
        pending = state.pending.get(index)
        if pending is not None:
            return pending.data
        ref = (await self.chunk_map(state)).get(index)
        if ref is None:
            return b""
        try:
            return await self.fetch(ref.digest)
        except ChunkLostError:
            # Another mount may have replaced this part of the file, and the old chunk is
            # gone: read the file's chunk map again (close-to-open allows the new bytes).
            state.chunk_map = None
            fresh = (await self.chunk_map(state)).get(index)
            if fresh == ref:
                raise
            return b"" if fresh is None else await self.fetch(fresh.digest)

    async def chunk_map(self, state: FileState) -> dict[int, ChunkRef]:
        if state.chunk_map is None:
            state.chunk_map = await self.offload.meta(self.meta.chunk_map, state.ino)
        return state.chunk_map

    async def fetch(self, digest: bytes) -> bytes:
        """A chunk's verified bytes; one store read however many ask at once."""
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
            data = await self.offload.chunks(self.store.get, self.meta.account_id, digest)
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
            await self.fetch(digest)
        except DfsfsError as error:
            log.info("readahead failed (the read itself will report it): %s", error)
