"""In-memory budgets and caches of the file-system core. Used from the trio loop only."""

from collections import OrderedDict

import trio

PRESSURE_REPEAT_S = 0.05


class ReadCache:
    """Verified chunk contents by digest, least recently used evicted past a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, digest: bytes) -> bytes | None:
        data = self._entries.get(digest)
        if data is not None:
            self._entries.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if len(data) > self.budget_bytes or digest in self._entries:
            return
        self._entries[digest] = data
        self.used_bytes += len(data)
        while self.used_bytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= len(evicted)

    def discard(self, digest: bytes) -> None:
        data = self._entries.pop(digest, None)
        if data is not None:
            self.used_bytes -= len(data)


class WriteBudget:
    """Bytes of buffered, not yet committed file data, bounded globally.

    A writer that would exceed the budget waits (back-pressure) and sets `pressure`
    so the flusher commits buffered data and frees room.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._room = trio.Event()
        self.pressure = trio.Event()

    async def reserve(self, nbytes: int) -> None:
        # A single request larger than the budget is let through alone.
        while self.used_bytes and self.used_bytes + nbytes > self.limit_bytes:
            self.pressure.set()  # again each round: a commit under way may free nothing
            with trio.move_on_after(PRESSURE_REPEAT_S):
                await self._room.wait()
        self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        if self.used_bytes < 0:
            raise AssertionError("write budget released more than reserved")
        self._room.set()
        self._room = trio.Event()

    @property
    def under_pressure(self) -> bool:
        return self.used_bytes > self.limit_bytes // 2
