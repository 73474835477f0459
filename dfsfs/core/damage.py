"""Damage the chunk stores found, recorded in the database from the trio side.

The mirrored store reports each bad copy from the worker thread that read it; recording
waits for the loop, so no chunk thread ever writes to the database. A chunk missing from
both stores that no file references any more is not damage: a reader with an old chunk
map met a chunk another mount had legitimately released.
"""

import logging
import queue

import trio

from dfsfs.chunks.mirrored import DamageEvent
from dfsfs.core.offload import Offload
from dfsfs.meta.store import MetadataStore

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.5


class DamageLog:
    def __init__(self, meta: MetadataStore, offload: Offload):
        self.meta = meta
        self.offload = offload
        self._events: queue.SimpleQueue[DamageEvent] = queue.SimpleQueue()

    def report(self, event: DamageEvent) -> None:
        """From any thread."""
        self._events.put(event)

    async def run(self) -> None:
        await trio.sleep(DRAIN_INTERVAL_S)
        await self.settle()

    async def settle(self) -> None:
        while not self._events.empty():
            event = self._events.get()
            if event.kind == "missing" and not event.repaired and not await self.offload.meta(
                    self.meta.chunk_referenced, event.digest):
                log.info("chunk %s was released while a reader still knew it: not damage",
                         event.digest.hex())
                continue
            log.warning("chunk %s: %s copy %s%s", event.digest.hex(), event.store, event.kind,
                        " (repaired)" if event.repaired else " (NOT repaired)")
            await self.offload.meta(self.meta.record_damage, event.digest, event.store,
                                    event.kind, event.repaired, event.detail)
