"""In-memory budgets and caches of the file-system core. Used from the trio loop only."""

import time
from collections import OrderedDict
from typing import Generic, TypeVar

import trio

K = TypeVar("K")
V = TypeVar("V")


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
    """Bytes of buffered file data not yet committed, bounded for the whole mount.

    Buffers charge what they hold (`charge`, positive or negative). A writer whose write
    would exceed the budget waits for room and sets `pressure`, on which the committer
    commits the largest buffers; a single write larger than the whole budget goes alone.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._room = trio.Event()
        self.pressure = trio.Event()

    async def wait_for_room(self, nbytes: int) -> None:
        while self.used_bytes and self.used_bytes + nbytes > self.limit_bytes:
            self.pressure.set()
            with trio.move_on_after(1.0):  # a commit that freed nothing is asked again
                await self._room.wait()

    def charge(self, delta: int) -> None:
        self.used_bytes += delta
        if self.used_bytes < 0:
            raise AssertionError("the write budget was charged below zero")
        if delta < 0:
            self._room.set()
            self._room = trio.Event()


class TTLCache(Generic[K, V]):
    """Values kept for `ttl_s` seconds; past `max_entries` the oldest half goes."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        if len(self._entries) > self.max_entries:
            for _ in range(len(self._entries) // 2):
                self._entries.popitem(last=False)

    def replace(self, key: K, value: V) -> None:
        """A new value for a key still kept, expiring when the old one would."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], value)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)
